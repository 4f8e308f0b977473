"""Adversarial code through the Sandbox API, under every isolation mode that works on this machine.

Each case must be contained and reported with exact fields; afterwards the trainer (this process) is alive, the
sandbox still runs code, no process of the block survives, and nothing in the test's tree outside the sandbox's
copy changed (hashed before and after). Where a mode does not promise something (`Sandbox.guarantees`), the case
is skipped for that mode rather than asserted loosely.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from stagewise.envs import sandbox as sandbox_mod
from stagewise.envs.sandbox import Sandbox, available_isolations

MODES = [m for m in available_isolations()]
TB = 'Traceback (most recent call last):\n  File "<string>", line {line}, in <module>\n    {src}\n'


def tree_digest(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        if p.is_symlink():
            body = os.readlink(p)
        elif p.is_file():
            body = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            body = "dir"
        out[str(p.relative_to(root))] = f"{st.st_mode:o}:{st.st_uid}:{body}"
    return out


def live_processes_of(uid: int) -> int:
    n = 0
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            status = (p / "status").read_text()
        except OSError:
            continue
        if f"Uid:\t{uid}\t" in status and "State:\tZ" not in status:
            n += 1
    return n


class Arena:
    """tmp/ (hashed): workspace/ (the task), secret.txt and outside/ next to it."""

    def __init__(self, root: Path):
        self.root = root
        self.workspace = root / "workspace"
        self.workspace.mkdir()
        (self.workspace / "data.csv").write_text("k,v\na,1\nb,2\na,3\n")
        self.secret = root / "secret.txt"
        self.secret.write_text("the trainer's secret\n")
        (root / "outside").mkdir()


@pytest.fixture(scope="module", params=MODES)
def arena_sandbox(request, tmp_path_factory):
    arena = Arena(tmp_path_factory.mktemp(f"arena-{request.param}"))
    with Sandbox(arena.workspace, timeout_s=5.0, max_processes=32, max_file_mb=8, isolation=request.param) as sb:
        yield arena, sb


@contextlib.contextmanager
def contained(arena: Arena, sb: Sandbox):
    before = tree_digest(arena.root)
    yield
    assert tree_digest(arena.root) == before
    assert sb.run("print(6 * 7)").output == "42\n"  # the sandbox still works
    if sb.uid is not None:  # every process of the block is gone; only the pre-forked next one is there
        assert settled_count(sb.uid) == 1


def settled_count(uid: int, stable_reads: int = 6) -> int:
    """The number of live processes of `uid` once it stops changing. Right after a block there is churn for a few
    ms: the finished process is exiting while the next one, just forked, has not switched to the uid yet."""
    deadline, history = time.monotonic() + 5.0, []
    while time.monotonic() < deadline:
        history.append(live_processes_of(uid))
        if len(history) >= stable_reads and len(set(history[-stable_reads:])) == 1:
            break
        time.sleep(0.02)
    return history[-1]


def need(sb: Sandbox, guarantee: str) -> None:
    if guarantee not in sb.guarantees:
        pytest.skip(f"isolation {sb.isolation!r} does not promise {guarantee}")


def test_infinite_loop(arena_sandbox):
    arena, sb = arena_sandbox
    with Sandbox(arena.workspace, timeout_s=1.0, isolation=sb.isolation) as quick, contained(arena, quick):
        start = time.monotonic()
        r = quick.run("while True:\n    pass")
        elapsed = time.monotonic() - start
    assert (r.output, r.error, r.timed_out, r.truncated, r.exit_reason) == (
        "[Error]:\nPython code execution timed out after 1.0 seconds.", True, True, False, "timeout")
    assert 1.0 <= r.duration_s < 1.5 and elapsed < 2.5


@pytest.mark.parametrize("code, line, message", [
    ("x = bytearray(10 * 1024**3)", "x = bytearray(10 * 1024**3)", "MemoryError"),
    ("import numpy as np; x = np.ones(10 * 1024**3 // 8)", "import numpy as np; x = np.ones(10 * 1024**3 // 8)",
     "MemoryError: Unable to allocate 10.0 GiB for an array with shape (1342177280,) and data type float64"),
])
def test_10gb_allocation(arena_sandbox, code, line, message):
    arena, sb = arena_sandbox
    need(sb, "memory_limit")
    with contained(arena, sb):
        r = sb.run(code)
    assert (r.output, r.error, r.timed_out, r.exit_reason) == (
        "[Error]:\n" + TB.format(line=1, src=line) + message, True, False, "exception")


def test_fork_bomb(arena_sandbox):
    arena, sb = arena_sandbox
    need(sb, "process_limit")
    with contained(arena, sb):
        r = sb.run("import os\nwhile True:\n    os.fork()")
    assert (r.output, r.error, r.timed_out, r.exit_reason) == (
        "[Error]:\n" + TB.format(line=3, src="os.fork()")
        + "BlockingIOError: [Errno 11] Resource temporarily unavailable",
        True, False, "exception")


def test_100mb_print(arena_sandbox):
    arena, sb = arena_sandbox
    with contained(arena, sb):
        r = sb.run("print('x' * 100_000_000)")
    # 100_000_000 x's and a newline, 8192 kept: 100_000_001 - 8192 = 99_991_809 left out.
    assert r.output == "x" * 8192 + "\n... [output truncated: 99991809 more characters]"
    assert (r.error, r.timed_out, r.truncated, r.exit_reason) == (False, False, True, "ok")


def test_100mb_print_then_error_keeps_the_error(arena_sandbox):
    arena, sb = arena_sandbox
    with contained(arena, sb):
        r = sb.run("print('y' * 100_000_000)\n1 / 0")
    assert r.output == ("y" * 8192 + "\n... [output truncated: 99991809 more characters]\n[Error]:\n"
                        + TB.format(line=2, src="1 / 0") + "ZeroDivisionError: division by zero")
    assert (r.error, r.truncated, r.exit_reason) == (True, True, "exception")


def test_trainer_environment_is_invisible(arena_sandbox, monkeypatch):
    arena, sb = arena_sandbox
    monkeypatch.setenv("STAGEWISE_SECRET", "hunter2")
    sandbox_mod._POOL.shutdown()  # no spare started before the variable was set: the next worker starts now
    with Sandbox(arena.workspace, isolation=sb.isolation) as fresh, contained(arena, fresh):
        r = fresh.run("import os\nprint(os.environ.get('STAGEWISE_SECRET'), sorted(os.environ))")
        leak = fresh.run(  # every environ the code can open: its own, the zygote's, pid 1's ...
            "import glob\nfound = []\nfor p in glob.glob('/proc/[0-9]*/environ'):\n    try:\n"
            "        found.append(b'hunter2' in open(p, 'rb').read())\n    except OSError:\n        pass\n"
            "print(any(found))")
    assert r.output == ("None ['ARROW_DEFAULT_MEMORY_POOL', 'HOME', 'LANG', 'LC_ALL', 'LOGNAME', 'MALLOC_ARENA_MAX', "
                        "'MKL_NUM_THREADS', 'MPLBACKEND', 'MPLCONFIGDIR', 'NUMEXPR_NUM_THREADS', 'OMP_NUM_THREADS', "
                        "'OPENBLAS_NUM_THREADS', 'PATH', 'PYTHONDONTWRITEBYTECODE', 'TMPDIR', 'USER']\n")
    assert leak.output == "False\n"


def test_reading_outside_the_workspace(arena_sandbox):
    arena, sb = arena_sandbox
    need(sb, "fs_confined")
    cases = {
        str(arena.secret): f"FileNotFoundError: [Errno 2] No such file or directory: '{arena.secret}'",
        "../secret.txt": "FileNotFoundError: [Errno 2] No such file or directory: '../secret.txt'",
        str(arena.workspace / "data.csv"):  # the original workspace is not reachable either
            f"FileNotFoundError: [Errno 2] No such file or directory: '{arena.workspace / 'data.csv'}'",
        "/etc/shadow": "FileNotFoundError: [Errno 2] No such file or directory: '/etc/shadow'",
        "/root/.bash_history": "FileNotFoundError: [Errno 2] No such file or directory: '/root/.bash_history'",
    }
    for path, message in cases.items():
        with contained(arena, sb):
            r = sb.run(f"print(open({path!r}).read())")
        src = f"print(open({path!r}).read())"
        assert (r.output, r.exit_reason) == ("[Error]:\n" + TB.format(line=1, src=src) + message, "exception"), path
    r = sb.run("print(open('data.csv').read())")  # its own copy is readable
    assert r.output == "k,v\na,1\nb,2\na,3\n\n"


def test_writing_outside_the_workspace(arena_sandbox):
    arena, sb = arena_sandbox
    need(sb, "fs_confined")
    private_tmp = f"/tmp/stagewise-adversarial-{os.getpid()}.txt"
    cases = {
        str(arena.root / "outside" / "x.txt"):
            f"FileNotFoundError: [Errno 2] No such file or directory: '{arena.root / 'outside' / 'x.txt'}'",
        str(arena.secret): f"FileNotFoundError: [Errno 2] No such file or directory: '{arena.secret}'",
        "/usr/evil.txt": "OSError: [Errno 30] Read-only file system: '/usr/evil.txt'",
        "/evil.txt": "PermissionError: [Errno 13] Permission denied: '/evil.txt'",
        sandbox_mod.sys.prefix + "/evil.txt":
            f"OSError: [Errno 30] Read-only file system: '{sandbox_mod.sys.prefix}/evil.txt'",
    }
    for path, message in cases.items():
        src = f"open({path!r}, 'w').write('pwned')"
        with contained(arena, sb):
            r = sb.run(src)
        assert (r.output, r.exit_reason) == ("[Error]:\n" + TB.format(line=1, src=src) + message, "exception"), path
        assert not Path(path).exists() or Path(path) == arena.secret
    # /tmp is the sandbox's own: writable inside, invisible on the host.
    with contained(arena, sb):
        r = sb.run(f"open({private_tmp!r}, 'w').write('mine')\nprint(open({private_tmp!r}).read())")
    assert r.output == "mine\n" and not Path(private_tmp).exists()


@pytest.fixture
def tcp_server():
    """A real server on the host's loopback that counts the connections it accepts."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    accepted, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except (TimeoutError, OSError):
                continue
            accepted.append(conn.recv(100))
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    stop.set()
    thread.join()
    server.close()


def test_opening_a_socket(arena_sandbox, tcp_server):
    arena, sb = arena_sandbox
    need(sb, "no_network")
    port, accepted = tcp_server
    src = f"s = socket.create_connection(('127.0.0.1', {port}), timeout=0.5); s.sendall(b'leak')"
    with contained(arena, sb):
        r = sb.run("import socket\n" + src)
        interfaces = sb.run("import socket\nprint([name for _, name in socket.if_nameindex()])")
    assert (r.output, r.exit_reason) == (
        "[Error]:\n" + TB.format(line=2, src=src) + "ConnectionRefusedError: [Errno 111] Connection refused",
        "exception")
    assert interfaces.output == "['lo']\n"
    assert accepted == []
    with socket.create_connection(("127.0.0.1", port)) as s:  # the server was there all along
        s.sendall(b"host")
    deadline = time.monotonic() + 2
    while not accepted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert accepted == [b"host"]


def test_killing_the_parent(arena_sandbox):
    arena, sb = arena_sandbox
    need(sb, "separate_uid")
    me = os.getpid()
    eperm = "PermissionError: [Errno 1] Operation not permitted"
    cases = [
        ("os.kill(os.getppid(), signal.SIGKILL)", eperm),  # the zygote
        ("os.kill(1, signal.SIGKILL)", eperm),  # pid 1 of the sandbox
        (f"os.kill({me}, signal.SIGKILL)", "ProcessLookupError: [Errno 3] No such process"),  # the trainer's pid
    ]
    for src, message in cases:
        with contained(arena, sb):
            r = sb.run("import os, signal\n" + src)
        assert (r.output, r.exit_reason) == ("[Error]:\n" + TB.format(line=2, src=src) + message, "exception"), src
    # kill(-1) reaches only the block's own uid: nothing but itself, which it skips.
    with contained(arena, sb):
        r = sb.run("import os, signal\ntry:\n    os.kill(-1, signal.SIGKILL)\nexcept OSError as e:\n"
                   "    print(type(e).__name__)\nprint('survived')")
    # In bwrap the zygote is pid 2 (kill(-1) finds it, is refused, and reports success); in "namespaces" the
    # zygote is pid 1 (skipped by kill(-1)), so no process is found.
    expected = {"bwrap": "survived\n", "namespaces": "ProcessLookupError\nsurvived\n"}[sb.isolation]
    assert (r.output, r.exit_reason) == (expected, "ok")
    with contained(arena, sb):
        r = sb.run("import os, signal\nprint('bye', flush=True)\nos.kill(os.getpid(), signal.SIGKILL)")
    assert (r.output, r.error, r.exit_reason) == ("bye\n[Error]:\nThe code process was killed by signal SIGKILL.",
                                                  True, "crashed")
    os.kill(me, 0)  # still here


def test_escaped_background_processes_are_killed(arena_sandbox):
    arena, sb = arena_sandbox
    need(sb, "pid_namespace")
    with contained(arena, sb):  # `contained` checks that only the pre-forked process of the next block is left
        r = sb.run("import os, subprocess\nsubprocess.Popen(['sleep', '60'], start_new_session=True)\n"
                   "if os.fork() == 0:\n    os.setsid()\n    import time\n    time.sleep(60)\nprint('parent done')")
    assert (r.output, r.exit_reason) == ("parent done\n", "ok")


def test_file_size_limit(arena_sandbox):
    arena, sb = arena_sandbox
    need(sb, "file_size_limit")
    src = "open('big.bin', 'wb').write(b'0' * (20 << 20))"
    with contained(arena, sb):
        r = sb.run(src)
    assert (r.output, r.exit_reason) == (
        "[Error]:\n" + TB.format(line=1, src=src) + "OSError: [Errno 27] File too large", "exception")
    assert (sb.workdir / "big.bin").stat().st_size == 8 << 20  # max_file_mb=8 written, then refused


TRAINER = """
import sys, time
from stagewise.envs.sandbox import Sandbox
sb = Sandbox(sys.argv[1], stateful=True, isolation=sys.argv[2]).__enter__()
r = sb.run("import subprocess\\nsubprocess.Popen(['sleep', '60'], start_new_session=True)\\nprint('started')")
print(sb.uid, sb.workdir, r.output.strip(), flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("mode", MODES)
def test_a_killed_trainer_leaves_no_process_behind(tmp_path, mode):
    """The trainer itself is SIGKILLed mid-trajectory: its zygotes (in use and spare) see their socket close and
    take every code process down with them."""
    if "separate_uid" not in sandbox_mod.guarantees(mode):
        pytest.skip("counting the code's processes needs the uid of their own")
    import subprocess
    import sys

    ws = tmp_path / "ws"
    ws.mkdir()
    (tmp_path / "trainer.py").write_text(TRAINER)
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # its sandbox directories land here (they leak on SIGKILL)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "trainer.py"), str(ws), mode], stdout=subprocess.PIPE,
                            text=True, env=env)
    uid, workdir, said = proc.stdout.readline().split()
    assert said == "started" and Path(workdir).is_relative_to(tmp_path)
    assert settled_count(int(uid)) == 2  # the stateful kernel and its detached `sleep`

    def leftovers() -> list[int]:  # the trainer's sandbox processes: their command lines name its TMPDIR
        found = []
        for p in Path("/proc").iterdir():
            try:
                if p.name.isdigit() and str(tmp_path).encode() in (p / "cmdline").read_bytes():
                    found.append(int(p.name))
            except OSError:
                continue
        return found

    assert len(leftovers()) >= 2  # the zygote in use and the spare (plus bwrap's own processes)
    proc.kill()
    proc.wait()
    proc.stdout.close()

    deadline = time.monotonic() + 10
    while (leftovers() or live_processes_of(int(uid))) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert leftovers() == [] and live_processes_of(int(uid)) == 0
