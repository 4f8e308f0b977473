"""Sandbox: code extraction, output capping, error format, environment, layout, and the semantics of real runs
(stateless vs stateful, truncation, per-trajectory copies, recovery from a dead worker)."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from stagewise.envs import _sandbox_worker as worker
from stagewise.envs.sandbox import (
    WORKSPACE,
    ExecResult,
    Sandbox,
    SandboxError,
    _bwrap_argv,
    _layout,
    available_isolations,
    code_env,
    extract_code,
    guarantees,
    prewarm,
    recyclable,
    resolve_isolation,
)

ROOT = os.geteuid() == 0


# ------------------------------------------------------------------------------------------ pure helpers
@pytest.mark.parametrize("turn, expected", [
    ("<Analyze>look</Analyze>\n<Code>\n```python\nprint(1)\n```\n</Code>", "print(1)"),
    ("<Code>```\nx = 2\nprint(x)\n```</Code>", "x = 2\nprint(x)"),
    ("<Code>print(3)</Code>", "print(3)"),
    ("<Code>a = 1</Code> then <Code>b = 2</Code>", "a = 1"),
    ("<Code>```python\nfirst()\n```\n```python\nsecond()\n```</Code>", "first()"),
    ("<Code>\n```python\n    for i in range(2):\n        print(i)\n```\n</Code>", "for i in range(2):\n    print(i)"),
    ("<Code>```python\nprint(5)\n</Code>", "print(5)"),  # unclosed fence: the rest of the block
    ("<Code>```py\nprint(6)```</Code>", "print(6)"),
    ("<Code></Code>", ""),
    ("<Answer>42</Answer>", None),
    ("<Code>print(1)", None),  # no closing tag: nothing to run
])
def test_extract_code(turn, expected):
    assert extract_code(turn) == expected


@pytest.mark.parametrize("limit, chunks, text, extra", [
    (10, [b"0123456789abcdef\n"], "0123456789\n... [output truncated: 7 more characters]", 7),
    (10, [b"01234", b"56789"], "0123456789", 0),
    (5, ["é".encode() * 20], "ééééé\n... [output truncated: 15 more characters]", 15),
    (3, [b"ab\xc3", b"\xa9cd"], "abé\n... [output truncated: 2 more characters]", 2),  # é split across reads
    (4, [b"\xff\xfeok"], "\ufffd\ufffdok", 0),  # invalid UTF-8 is replaced, not fatal
])
def test_capped_keeps_head_and_counts_characters(limit, chunks, text, extra):
    capped = worker._Capped(limit)
    for chunk in chunks:
        capped.feed(chunk)
    capped.feed(b"", final=True)
    assert (capped.text(), capped.extra) == (text, extra)


@pytest.mark.parametrize("code, expected", [
    ("x = 1\ny = x / 0\n",
     'Traceback (most recent call last):\n  File "<string>", line 2, in <module>\n    y = x / 0\n'
     "ZeroDivisionError: division by zero"),
    ("def f(d):\n    return d['missing']\nf({})\n",  # the innermost line of the block, inside f
     'Traceback (most recent call last):\n  File "<string>", line 2, in f\n    return d[\'missing\']\n'
     "KeyError: 'missing'"),
    ("for i in range(3)\n    pass\n",
     'Traceback (most recent call last):\n  File "<string>", line 1\n    for i in range(3)\n'
     "SyntaxError: expected ':'"),
    ("class Boom(Exception): pass\nraise Boom()\n",
     'Traceback (most recent call last):\n  File "<string>", line 2, in <module>\n    raise Boom()\nBoom'),
    ("import json\njson.loads('{')\n",  # the failing line of the block, not of the library
     'Traceback (most recent call last):\n  File "<string>", line 2, in <module>\n    json.loads(\'{\')\n'
     "JSONDecodeError: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
    ("import sys\nsys.exit(3)\n",
     'Traceback (most recent call last):\n  File "<string>", line 2, in <module>\n    sys.exit(3)\nSystemExit: 3'),
])
def test_condensed_traceback(code, expected):
    error = worker._run_block(code, {"__name__": "__main__"}, "<string>", {})
    assert error == "[Error]:\n" + expected


def test_clean_exits_are_not_errors():
    for code in ("x = 1", "import sys\nsys.exit(0)", "raise SystemExit"):
        assert worker._run_block(code, {}, "<string>", {}) is None


def test_code_env_is_minimal_and_fixed(monkeypatch):
    monkeypatch.setenv("STAGEWISE_SECRET", "hunter2")
    env = code_env("/tmp")
    assert sorted(env) == ["ARROW_DEFAULT_MEMORY_POOL", "HOME", "LANG", "LC_ALL", "LOGNAME", "MALLOC_ARENA_MAX",
                           "MKL_NUM_THREADS", "MPLBACKEND", "MPLCONFIGDIR", "NUMEXPR_NUM_THREADS", "OMP_NUM_THREADS",
                           "OPENBLAS_NUM_THREADS", "PATH", "PYTHONDONTWRITEBYTECODE", "TMPDIR", "USER"]
    assert (env["HOME"], env["TMPDIR"], env["MPLBACKEND"], env["OMP_NUM_THREADS"]) == ("/tmp", "/tmp", "Agg", "1")
    assert "hunter2" not in "".join(env.values())


def test_layout_and_bwrap_flags():
    layout = _layout("/S")
    assert ("rw", "/S/workspace", WORKSPACE) in layout
    assert ("rw", "/S/tmp", "/tmp") in layout and ("ro", "/usr", "/usr") in layout
    import sys
    assert any(kind == "ro" and sys.prefix.startswith(dst) for kind, _, dst in layout) or sys.prefix.startswith("/usr")
    assert not any(dst in ("/etc", "/root", "/home", "/work") for _, _, dst in layout)  # no wholesale host dirs
    argv = _bwrap_argv("/S")
    assert argv[0] == "bwrap" and argv[-3:] == ["--chdir", WORKSPACE, "--"]
    for flag in ("--unshare-net", "--unshare-pid", "--unshare-ipc", "--new-session"):
        assert flag in argv
    if ROOT:
        assert argv[argv.index("--cap-drop") + 1] == "ALL"
        assert [argv[i + 1] for i, a in enumerate(argv) if a == "--cap-add"] == ["CAP_SETUID", "CAP_SETGID", "CAP_KILL"]
    # Every destination's parent exists before it is used (bwrap would create missing ones with mode 0700).
    made = {"/"}
    i = argv.index("--new-session") + 1
    while argv[i] != "--chdir":
        flag = argv[i]
        dst = argv[i + 1] if flag in ("--dir", "--dev", "--proc") else argv[i + 2]
        if flag in ("--cap-drop", "--cap-add"):
            i += 2
            continue
        assert str(Path(dst).parent) in made, (flag, dst)
        made.add(dst)
        i += 2 if flag in ("--dir", "--dev", "--proc") else 3


@pytest.mark.skipif(not ROOT, reason="the table is the root one")
def test_guarantees_per_mode_as_root():
    base = {"scrubbed_env", "memory_limit", "file_size_limit", "workspace_copy", "separate_uid", "process_limit"}
    assert guarantees("bwrap") == guarantees("namespaces") == base | {"no_network", "fs_confined", "pid_namespace"}
    assert guarantees("none") == base


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        Sandbox(tmp_path / "nope")
    with pytest.raises(ValueError, match="timeout_s must be > 0, got 0"):
        Sandbox(tmp_path, timeout_s=0)
    with pytest.raises(ValueError, match="isolation must be 'auto' or one of"):
        Sandbox(tmp_path, isolation="docker")
    with pytest.raises(RuntimeError, match="outside its `with` block"):
        Sandbox(tmp_path).run("print(1)")
    for mode in {"bwrap", "namespaces", "none"} - set(available_isolations()):
        with pytest.raises(SandboxError, match=f"isolation '{mode}' is not available here"):
            resolve_isolation(mode)


# ------------------------------------------------------------------------------------------ real runs
def _csv(path: Path) -> None:
    rows = ["k,v"] + [f"{'abc'[i % 3]},{i}" for i in range(1000)]
    path.write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("task")
    _csv(ws / "data.csv")
    (ws / "notes.txt").write_text("original\n")
    return ws


@pytest.fixture(scope="module")
def stateless(task):
    with Sandbox(task, timeout_s=2.0) as sb:
        yield sb


def test_pandas_reads_the_workspace_csv(stateless):
    # a: 0+3+...+999 = 166833; b: 1+4+...+997 = 166167; c: 2+5+...+998 = 166500
    r = stateless.run("import pandas as pd\nprint(pd.read_csv('data.csv').groupby('k')['v'].sum().to_dict())")
    assert r == ExecResult(output="{'a': 166833, 'b': 166167, 'c': 166500}\n", error=False, timed_out=False,
                           truncated=False, duration_s=r.duration_s, exit_reason="ok")
    assert 0 < r.duration_s < 2.0


def test_the_data_stack_works_inside(tmp_path):
    """The task files the synthetic generator writes (CSV, XLSX, SQLite) and a saved figure, through the
    restricted filesystem (lazy imports, fonts and the C libraries must all be reachable)."""
    import sqlite3

    import pandas as pd

    pd.DataFrame({"name": ["x", "y"], "score": [3, 4]}).to_excel(tmp_path / "t.xlsx", index=False)
    with sqlite3.connect(tmp_path / "t.db") as con:
        con.execute("create table t (a int)")
        con.executemany("insert into t values (?)", [(1,), (2,), (5,)])
    con.close()
    code = ("import pandas as pd, sqlite3, matplotlib.pyplot as plt\n"
            "print(pd.read_excel('t.xlsx')['score'].sum())\n"
            "print(sqlite3.connect('t.db').execute('select sum(a) from t').fetchone()[0])\n"
            "plt.plot([1, 2], [3, 4]); plt.title('hello'); plt.savefig('fig.png')\n"
            "print(plt.get_backend())")
    with Sandbox(tmp_path) as sb:
        r = sb.run(code)
        png = (sb.workdir / "fig.png").read_bytes()
    assert (r.output, r.exit_reason) == ("7\n8\nAgg\n", "ok")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert not (tmp_path / "fig.png").exists()


def test_stateless_blocks_share_files_not_variables(stateless):
    steps = [
        ("x = 41\nopen('x.txt', 'w').write(str(x))", ""),
        ("print(open('x.txt').read())", "41\n"),
        ("print(x)", '[Error]:\nTraceback (most recent call last):\n  File "<string>", line 1, in <module>\n'
                     "    print(x)\nNameError: name 'x' is not defined"),
        ("import sys\nprint(sorted(k for k in globals() if not k.startswith('__')), __name__)", "['sys'] __main__\n"),
        ("import os\nprint(os.getcwd() == os.path.realpath('.'), sorted(os.listdir('.')))",
         "True ['data.csv', 'notes.txt', 'x.txt']\n"),
    ]
    for code, expected in steps:
        assert stateless.run(code).output == expected, code


def test_stateful_blocks_keep_variables(task):
    with Sandbox(task, stateful=True, timeout_s=1.0) as sb:
        assert sb.run("import pandas as pd\ndf = pd.read_csv('data.csv')\ntotal = 0").output == ""
        assert sb.run("total += int(df.v.sum())\nprint(total)").output == "499500\n"
        assert sb.run("total += 1\nprint(total)").output == "499501\n"
        r = sb.run("def half(v):\n    return v / 0\nhalf(total)")
        assert r.output == ('[Error]:\nTraceback (most recent call last):\n  File "<cell-4>", line 2, in half\n'
                            "    return v / 0\nZeroDivisionError: division by zero")
        assert sb.run("print(total, callable(half))").output == "499501 True\n"  # an exception keeps the state
        r = sb.run("while True:\n    pass")
        assert (r.timed_out, r.error, r.exit_reason) == (True, True, "timeout")
        assert r.output == "[Error]:\nPython code execution timed out after 1.0 seconds. The Python state was reset."
        assert sb.run("print('total' in globals())").output == "False\n"


def test_stdout_and_stderr_in_order_and_subprocess_output(stateless):
    code = "import sys\nprint('a')\nprint('b', file=sys.stderr)\nsys.stderr.write('c\\n')\nprint('d')"
    assert stateless.run(code).output == "a\nb\nc\nd\n"
    assert stateless.run("import subprocess\nsubprocess.run(['echo', 'from a child'])").output == "from a child\n"
    assert stateless.run("import warnings\nwarnings.warn('careful')").output == \
        "<string>:2: UserWarning: careful\n  warnings.warn('careful')\n"  # the block's source line, via linecache


@pytest.mark.parametrize("code, output, reason", [
    ("print('partial')\nraise ValueError('bad value')",
     'partial\n[Error]:\nTraceback (most recent call last):\n  File "<string>", line 2, in <module>\n'
     "    raise ValueError('bad value')\nValueError: bad value", "exception"),
    ("import os\nos._exit(3)", "[Error]:\nThe code process exited with status 3.", "crashed"),
    ("import os, signal\nprint('bye', flush=True)\nos.kill(os.getpid(), signal.SIGSEGV)",
     "bye\n[Error]:\nThe code process was killed by signal SIGSEGV.", "crashed"),
    ("import sys\nprint('done')\nsys.exit(0)", "done\n", "ok"),
    ("if __name__ == '__main__':\n    print('main')", "main\n", "ok"),
    ("import threading, time\nthreading.Thread(target=lambda: (time.sleep(0.2), print('late'))).start()",
     "late\n", "ok"),  # like a script, a stateless block waits for its non-daemon threads
])
def test_error_format_and_exit_reasons(stateless, code, output, reason):
    r = stateless.run(code)
    assert (r.output, r.exit_reason, r.error, r.timed_out) == (output, reason, reason != "ok", False)


def test_timeout_is_an_error_with_a_colon(stateless):
    r = stateless.run("import time\nprint('started', flush=True)\ntime.sleep(30)")
    assert r.output == "started\n[Error]:\nPython code execution timed out after 2.0 seconds."
    assert (r.error, r.timed_out, r.exit_reason) == (True, True, "timeout")
    assert 2.0 <= r.duration_s < 3.0


@pytest.fixture(scope="module")
def capped_at_10(task):
    with Sandbox(task, max_output_chars=10) as sb:
        yield sb


@pytest.mark.parametrize("code, output", [
    ("print('0123456789abcdef')", "0123456789\n... [output truncated: 7 more characters]"),
    ("print('é' * 20)", "éééééééééé\n... [output truncated: 11 more characters]"),
    ("print('short')", "short\n"),
    ("for i in range(3):\n    print(i)", "0\n1\n2\n"),
    # The error block is appended after the capped output and capped on its own: it is
    # 9 ("[Error]:\n") + 35 (header) + 39 (File line) + 24 (source line) + 13 ("KeyError: 'k'") = 120 characters.
    ("print('12345678')\nraise KeyError('k')",
     "12345678\n[Error]:\nT\n... [output truncated: 110 more characters]"),
])
def test_truncation_marker(capped_at_10, code, output):
    r = capped_at_10.run(code)
    assert r.output == output
    assert r.truncated == ("truncated" in output)


def test_trajectories_get_private_copies(task):
    before = {p.name: p.read_bytes() for p in task.iterdir()}
    with Sandbox(task) as a, Sandbox(task) as b:
        assert a.workdir != b.workdir and a.workdir.parent.exists()
        assert a.run("open('notes.txt', 'a').write('from a\\n')\nopen('a.txt', 'w').write('a')").output == ""
        assert b.run("open('b.txt', 'w').write('b')").output == ""
        assert a.run("import os\nprint(sorted(os.listdir('.')), open('notes.txt').read())").output == \
            "['a.txt', 'data.csv', 'notes.txt'] original\nfrom a\n\n"
        assert b.run("import os\nprint(sorted(os.listdir('.')), open('notes.txt').read())").output == \
            "['b.txt', 'data.csv', 'notes.txt'] original\n\n"
        assert (a.workdir / "a.txt").read_text() == "a"  # the env can collect what a trajectory wrote
        outs: dict[str, list[str]] = {"a": [], "b": []}  # both at once, from two threads, as the env runs them
        threads = [threading.Thread(target=lambda sb=sb, tag=tag: outs[tag].extend(
            sb.run(f"print({tag!r}, {i}, open('{tag}.txt').read())").output for i in range(5)))
            for sb, tag in ((a, "a"), (b, "b"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert outs == {tag: [f"{tag} {i} {tag}\n" for i in range(5)] for tag in "ab"}
        sbx_dirs = [a.workdir.parent, b.workdir.parent]
    assert {p.name: p.read_bytes() for p in task.iterdir()} == before  # the task's workspace is never written
    # On exit a copy is removed, or wiped when its zygote is kept for the next trajectory (`_Pool.release`).
    assert not any(d.exists() and any((d / "workspace").iterdir()) for d in sbx_dirs)


@pytest.mark.skipif(not recyclable(resolve_isolation()), reason="zygotes are reused only with fs_confined + "
                    "separate_uid (root with bwrap or namespaces)")
def test_a_reused_zygote_keeps_nothing_of_the_last_trajectory(task):
    """A stateless trajectory's zygote serves the next one (no second interpreter start), and that one finds
    only its own workspace: no files the first wrote anywhere, no process it left running, the modes reset."""
    prewarm(1, wait=True)
    leave_traces = ("import os, subprocess\n"
                    "for path in ('left.txt', '/tmp/left.txt', '/dev/shm/left.txt'):\n"
                    "    open(path, 'w').write('x')\n"
                    "os.makedirs('sub/dir')\nos.chmod('sub', 0o500)\nos.chmod('.', 0o700)\n"
                    "subprocess.Popen(['sleep', '60'], start_new_session=True)\nprint('left')")
    look = ("import os, stat\nprint(sorted(os.listdir('.')), os.listdir('/tmp'), os.listdir('/dev/shm'), "
            "oct(stat.S_IMODE(os.stat('.').st_mode)), oct(stat.S_IMODE(os.stat('/tmp').st_mode)))")
    with Sandbox(task) as first:
        assert first.run(leave_traces).output == "left\n"
        uid, sbx = first.uid, first.workdir.parent
    with Sandbox(task) as second:
        assert (second.uid, second.workdir.parent) == (uid, sbx)  # the same zygote and directories
        assert _live_processes_of(uid, settle_to=1) == 1  # its pre-forked kernel only: the `sleep` is gone
        assert second.run(look).output == "['data.csv', 'notes.txt'] [] [] 0o755 0o1777\n"
    with Sandbox(task, stateful=True) as stateful:  # a stateful zygote runs code in itself: never reused
        stateful_sbx = stateful.workdir.parent
    assert not stateful_sbx.exists()


def test_no_workspace_gives_an_empty_directory():
    with Sandbox(None) as sb:
        assert sb.run("import os\nprint(os.listdir('.'))").output == "[]\n"


def _zygote_host_pid(sb: Sandbox) -> int:
    """The root-owned sandbox_worker process deepest under the sandbox's outer process."""
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(p.name))
    found, stack = None, [sb._worker.proc.pid]
    while stack:
        pid = stack.pop()
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            uid = int(Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[0])
        except OSError:
            continue
        if b"sandbox_worker" in cmd and uid == os.geteuid():
            found = pid
        stack += children.get(pid, [])
    assert found is not None
    return found


def test_dead_worker_is_reported_then_replaced(task):
    with Sandbox(task, stateful=True) as sb:
        assert sb.run("x = 1\nopen('kept.txt', 'w').write('kept')").output == ""
        zygote = _zygote_host_pid(sb)
        killer = threading.Timer(0.5, os.kill, (zygote, signal.SIGKILL))
        killer.start()
        r = sb.run("import time\ntime.sleep(5)")
        killer.join()
        assert (r.error, r.timed_out, r.exit_reason) == (True, False, "sandbox_failure")
        assert r.output == ("[Error]:\nThe sandbox worker died while running this code; the Python state and all "
                            "processes were reset.")
        assert r.duration_s < 4.0
        # The next block runs in a new worker on the same files, with a fresh namespace.
        assert sb.run("print(open('kept.txt').read(), 'x' in globals())").output == "kept False\n"
        uid = sb.uid
    assert uid is None or _live_processes_of(uid, settle_to=0) == 0


def _live_processes_of(uid: int, settle_to: int | None = None, within_s: float = 5.0) -> int:
    """Processes of ``uid`` that are not zombies. ``settle_to``: poll up to ``within_s`` for that count first (a
    SIGKILLed process stays listed until the kernel schedules its exit: milliseconds, more on a busy machine)."""
    deadline = time.monotonic() + within_s
    while settle_to is not None and _count_live(uid) != settle_to and time.monotonic() < deadline:
        time.sleep(0.05)
    return _count_live(uid)


def _count_live(uid: int) -> int:
    n = 0
    for p in Path("/proc").iterdir():
        try:
            status = (p / "status").read_text() if p.name.isdigit() else ""
        except OSError:
            continue
        if f"Uid:\t{uid}\t" in status and "State:\tZ" not in status:
            n += 1
    return n


def test_exit_kills_every_code_process(task):
    with Sandbox(task, stateful=True) as sb:
        code = "import subprocess\np = subprocess.Popen(['sleep', '60'], start_new_session=True)\nprint(p.pid > 0)"
        assert sb.run(code).output == "True\n"
        uid = sb.uid
        if uid is not None:
            assert _live_processes_of(uid) == 2  # the stateful kernel and its detached `sleep`
    assert uid is None or _live_processes_of(uid, settle_to=0) == 0
