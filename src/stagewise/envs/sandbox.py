"""Sandbox: run model-written Python blocks against a private copy of a task's workspace.

    with Sandbox("workspaces/task_17", timeout_s=10, memory_mb=2048) as sb:
        r = sb.run("import pandas as pd\\nprint(pd.read_csv('data.csv').shape)")
        r.output, r.error, r.timed_out, r.truncated, r.exit_reason, r.duration_s

How it works. `__enter__` takes a pre-warmed *zygote* (a Python process that already imported numpy, pandas,
matplotlib with Agg and openpyxl; see `_sandbox_worker.py`), copies the workspace into the zygote's empty
workspace directory, and hands it to this trajectory. Each block runs in a process forked from that zygote:
a fresh one per block (`stateful=False`, DeepAnalyze's training semantics: an empty namespace every time) or one
per trajectory (`stateful=True`, Jupyter-like: variables persist across the blocks of this Sandbox). The next
stateless process is forked while the model generates, so a block costs its own run time plus a few ms of IPC,
instead of the ~1.3 s interpreter start and imports of a fresh `python`. One spare zygote per isolation mode
is kept warm (`prewarm(n)` raises that), so `__enter__` costs a directory copy. With `stateful=True`, a timeout
or a crash kills the trajectory's process, so the next block starts from an empty namespace (the error message
says so), and output that background threads print after a block ends shows up in the next block's output.

Isolation (`isolation=`, `"auto"` picks the first that works here; `Sandbox.guarantees` names what holds):
- "bwrap" (bubblewrap installed; CI: `apt-get install -y bubblewrap`): new net/pid/ipc/uts/cgroup namespaces;
  a root with only /usr (+ the /bin, /lib* links), a few /etc files (ld.so.cache, localtime, alternatives,
  fonts, mime.types) and the Python installation, all read-only; /workspace (the copy), /tmp and /dev/shm
  private and writable; minimal /dev and /proc. No network at all: only a loopback with nothing on it.
  As root, the zygote keeps CAP_SETUID/SETGID/KILL only, and every block runs under a uid of its own
  (UID_BASE + pid of the sandbox), so it can neither signal nor ptrace the zygote and RLIMIT_NPROC counts only
  its own processes. Without root, bwrap adds a user namespace; code then shares the zygote's uid (so it can
  kill the zygote: that block is reported as a sandbox failure and a new zygote starts).
- "namespaces" (no bubblewrap, root needed): the same layout built by the worker itself with unshare(2),
  bind mounts and a chroot into the new root; loopback brought up; the same uid drop. Same guarantees.
- "none" (neither is possible, e.g. an unprivileged container): rlimits, the scrubbed environment, the
  per-trajectory copy as cwd, timeouts. As root it still drops to the sandbox uid (and refuses to run when the
  interpreter is not readable by that uid: code running as real root could kill every process on the host).
  It does NOT stop reading world-readable files, writing world-writable places such as /tmp, or using the
  network. Without root the code runs as the trainer's user: it can signal the trainer and every other process
  of that user, RLIMIT_NPROC is not set (it would count all of that user's processes), and processes that leave
  the block's session escape cleanup. A warning is logged once.
In every mode: the environment is a fixed minimal one (`code_env`), never the trainer's; RLIMIT_AS (memory_mb,
which includes the ~400 MB of address space the preloaded libraries already map), RLIMIT_FSIZE, RLIMIT_CORE=0,
RLIMIT_NPROC where it is enforceable, no_new_privs; wall time; stdout+stderr of the block and its children,
in order, capped at `max_output_chars` with a visible marker. After a stateless block and after any timeout,
every process the block started is killed. Not covered: disk usage within the workspace and /tmp (only the
per-file cap), CPU shares, syscall filtering (no seccomp).

Departures from DeepAnalyze (github.com/ruc-datalab/DeepAnalyze)'s code-execution environment:
- Its workspace directory was shared by the 5 samples of a prompt and never reset; ours is a copy per Sandbox.
- Its timeout message `[Error]\\n...` lacked the colon, so the code reward counted timeouts as successes; ours
  says `[Error]:`. A crash (signal, os._exit) is an error too.
- It dropped what the block printed before an exception; we keep it, then append the `[Error]:` block. Its
  condensed traceback showed the outermost frame of the block; we show the innermost one in the block.
- Its exec globals lacked `__name__`, so `if __name__ == "__main__":` bodies silently never ran; ours run.
- No output cap there; here `max_output_chars` (EnvConfig.max_output_chars, 8192 by default).
"""
from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import re
import shutil
import site
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

log = logging.getLogger(__name__)

ISOLATIONS = ("bwrap", "namespaces", "none")
WORKSPACE = "/workspace"  # the code's cwd under bwrap and namespaces
UID_BASE = 1_500_000_000  # + the sandbox's pid; far above login, system, systemd-dynamic and subuid ranges
READY_TIMEOUT_S = 120.0  # zygote start (interpreter + imports) on a loaded machine
REPLY_GRACE_S = 30.0  # on top of timeout_s before the trainer gives up on a zygote
_WORKER = Path(__file__).with_name("_sandbox_worker.py")
_WORKER_IN_SANDBOX = "/opt/stagewise/sandbox_worker.py"
_ETC = ("/etc/ld.so.cache", "/etc/localtime", "/etc/alternatives", "/etc/fonts", "/etc/mime.types")


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up (not an error of the code it runs)."""


@dataclass(frozen=True)
class ExecResult:
    output: str  # stdout+stderr in order, capped, then the `[Error]:` block if any
    error: bool  # exception, timeout, crash or sandbox failure
    timed_out: bool
    truncated: bool  # the output (or the error message) was cut at max_output_chars
    duration_s: float
    exit_reason: str  # "ok" | "exception" | "timeout" | "crashed" | "sandbox_failure"


# ------------------------------------------------------------------------------------------ code extraction
_CODE_BLOCK = re.compile(r"<Code>(.*?)</Code>", re.DOTALL)
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def extract_code(turn_text: str) -> str | None:
    """The code of the first `<Code>...</Code>` block: its first fenced block (```python or ```), else the raw
    content; dedented and stripped. None when the turn has no complete `<Code>` block."""
    match = _CODE_BLOCK.search(turn_text)
    if match is None:
        return None
    fence = _FENCE.search(match.group(1))
    return textwrap.dedent(fence.group(1) if fence else match.group(1)).strip()


# ------------------------------------------------------------------------------------------ environment
def code_env(home: str = "/tmp") -> dict[str, str]:
    """The whole environment the code sees. Nothing is inherited from the trainer."""
    py_bin = os.path.dirname(sys.executable)
    return {
        "PATH": f"{py_bin}:/usr/local/bin:/usr/bin:/bin",
        "HOME": home, "TMPDIR": home, "USER": "sandbox", "LOGNAME": "sandbox",
        "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
        "MPLBACKEND": "Agg", "MPLCONFIGDIR": f"{home}/.matplotlib", "PYTHONDONTWRITEBYTECODE": "1",
        # One thread per library: threads count against RLIMIT_NPROC and each glibc arena against RLIMIT_AS.
        "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NUMEXPR_NUM_THREADS": "1",
        "MALLOC_ARENA_MAX": "2", "ARROW_DEFAULT_MEMORY_POOL": "system",
    }


def _python_paths() -> list[str]:
    """Directories the interpreter needs, outside /usr, with nested ones dropped."""
    cands = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.realpath(sys.executable)), *site.getsitepackages()}
    real = sorted({os.path.realpath(p) for p in cands if os.path.isdir(p)})
    return [p for p in real if p != "/usr" and not any(p.startswith(q + "/") for q in [*real, "/usr"])]


def _layout(sbx: str) -> list[tuple[str, str, str]]:
    """(kind, source, destination): the filesystem the code sees. bwrap flags and the namespaces fallback are
    both generated from this one list."""
    ops: list[tuple[str, str, str]] = [("ro", "/usr", "/usr")]
    for d in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(d):
            ops.append(("symlink", os.readlink(d), d))
        elif os.path.isdir(d):
            ops.append(("ro", d, d))
    ops += [("ro", f, f) for f in _ETC if os.path.exists(f)]
    ops += [("dev", "", "/dev"), ("proc", "", "/proc"), ("rw", f"{sbx}/tmp", "/tmp"),
            ("rw", f"{sbx}/shm", "/dev/shm"), ("rw", f"{sbx}/workspace", WORKSPACE),
            ("ro", str(_WORKER), _WORKER_IN_SANDBOX)]
    ops += [("ro", p, p) for p in _python_paths()]
    return ops


def _bwrap_argv(sbx: str) -> list[str]:
    argv = ["bwrap", "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--hostname", "sandbox", "--new-session"]
    if os.geteuid() == 0:
        argv += ["--cap-drop", "ALL"]
        for cap in ("CAP_SETUID", "CAP_SETGID", "CAP_KILL"):  # the zygote's; the code drops them with its uid
            argv += ["--cap-add", cap]
    else:
        argv.append("--unshare-user")
    flags = {"ro": "--ro-bind", "rw": "--bind", "symlink": "--symlink"}
    made = {"/"}
    for kind, src, dst in _layout(sbx):
        for parent in reversed(Path(dst).parents):  # bwrap would create missing parents with mode 0700
            if str(parent) not in made:
                argv += ["--dir", str(parent)]
                made.add(str(parent))
        argv += [flags[kind], src, dst] if kind in flags else [f"--{kind}", dst]
        made.add(dst)
    return argv + ["--chdir", WORKSPACE, "--"]


# ------------------------------------------------------------------------------------------ isolation modes
@functools.cache
def _probe(mode: str) -> str | None:
    """None when `mode` works here, else the reason it does not."""
    if mode == "none":
        if os.geteuid() == 0 and not _world_readable_python():
            return ("refusing to run code as root without namespaces: the interpreter is not readable by other "
                    "users, so the code could not drop to a uid of its own")
        return None
    if mode == "bwrap":
        if shutil.which("bwrap") is None:
            return "bubblewrap is not installed (apt-get install -y bubblewrap)"
        argv = ["bwrap", "--ro-bind", "/", "/", "--unshare-net", "--unshare-pid", "--unshare-ipc"]
        argv += [] if os.geteuid() == 0 else ["--unshare-user"]
        argv += ["--", "true"]
    else:
        if os.geteuid() != 0:
            return "the namespaces fallback needs root (unprivileged users get bubblewrap)"
        argv = [sys.executable, "-I", str(_WORKER), json.dumps({"probe": True})]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=code_env())
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{argv[0]} failed: {exc}"
    return None if proc.returncode == 0 else f"{mode} probe failed: {proc.stderr.strip()[-500:]}"


def available_isolations() -> tuple[str, ...]:
    return tuple(m for m in ISOLATIONS if _probe(m) is None)


def resolve_isolation(requested: str = "auto") -> str:
    if requested == "auto":
        modes = available_isolations()
        if not modes:
            raise SandboxError("No sandbox isolation works here: " + "; ".join(f"{m}: {_probe(m)}" for m in ISOLATIONS))
        mode = modes[0]
        if mode == "none":
            _warn_none_once(_probe("bwrap"), _probe("namespaces"))
        return mode
    if requested not in ISOLATIONS:
        raise ValueError(f"Sandbox isolation must be 'auto' or one of {ISOLATIONS}, got {requested!r}")
    reason = _probe(requested)
    if reason:
        raise SandboxError(f"Sandbox isolation {requested!r} is not available here: {reason}")
    return requested


@functools.cache
def _warn_none_once(*reasons: str | None) -> None:
    log.warning("Sandbox: no bubblewrap and no namespaces (%s); code runs with rlimits, a scrubbed environment and "
                "a private workspace copy only: it can read world-readable files, write world-writable ones and "
                "use the network.", "; ".join(r for r in reasons if r))


@functools.cache
def _world_readable_python() -> bool:
    """Can a fresh uid reach the interpreter's files (not under /root, say)? Mode "none" as root needs it."""
    for top in _python_paths():
        path = Path(top)
        for p in [path, *path.parents]:
            if not p.stat().st_mode & 0o001:
                return False
    return True


def guarantees(mode: str) -> frozenset[str]:
    """The names of what holds for code run under `mode` on this machine (tests assert exactly these)."""
    root = os.geteuid() == 0  # as root, code always runs under a uid of its own ("none" refuses otherwise)
    g = {"scrubbed_env", "memory_limit", "file_size_limit", "workspace_copy"}
    if mode != "none":
        g |= {"no_network", "fs_confined", "pid_namespace"}
    if root:
        g.add("separate_uid")
    if root or mode == "bwrap":  # RLIMIT_NPROC counts a fresh uid, or a fresh user namespace (non-root bwrap)
        g.add("process_limit")
    return frozenset(g)


# ------------------------------------------------------------------------------------------ worker processes
_WRITABLE = (("workspace", 0o755), ("tmp", 0o1777), ("shm", 0o1777))  # a zygote's writable dirs and their modes


def recyclable(mode: str) -> bool:
    """Can a zygote that ran stateless blocks serve another trajectory? Only where the code could write nothing
    but the zygote's own directories (fs_confined) and could not touch the zygote itself (separate_uid: the
    blocks ran under another uid, so they could neither signal nor ptrace it). Every block then ran in a process
    forked from the zygote and killed afterwards, so the zygote's own state is as it was at start."""
    return {"fs_confined", "separate_uid"} <= guarantees(mode)


def _chown_tree(path: str, uid: int) -> None:
    os.lchown(path, uid, uid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), uid, uid)


def _remove_tree(path: str) -> None:
    def retry(func, p, _exc):  # a block may leave read-only directories behind
        os.chmod(os.path.dirname(p), 0o700)
        func(p)

    shutil.rmtree(path, onerror=retry)


class _Worker:
    """One zygote process and its directory: <sbx>/workspace (the copy), tmp, shm, worker.log."""

    def __init__(self, mode: str, sbx: str):
        self.mode, self.sbx = mode, sbx
        self.workspace = f"{sbx}/workspace"
        parent, child = socket.socketpair()
        cfg = {"fd": child.fileno(), "mode": mode, "workspace": WORKSPACE}
        if mode == "bwrap":
            argv = _bwrap_argv(sbx) + [sys.executable, "-I", _WORKER_IN_SANDBOX]
        else:
            argv = [sys.executable, "-I", str(_WORKER)]
        if mode == "namespaces":
            os.makedirs(f"{sbx}/root", exist_ok=True)
            cfg |= {"root": f"{sbx}/root", "layout": _layout(sbx)}
        home = "/tmp" if mode != "none" else f"{sbx}/tmp"
        with open(f"{sbx}/worker.log", "ab") as logf:
            self.proc = subprocess.Popen(argv + [json.dumps(cfg)], stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=logf, pass_fds=(child.fileno(),), env=code_env(home),
                                         cwd=self.workspace, start_new_session=True)
        child.close()
        self.uid = UID_BASE + self.proc.pid if os.geteuid() == 0 else None
        if self.uid is not None:
            for d in ("workspace", "tmp", "shm"):
                _chown_tree(f"{sbx}/{d}", self.uid)
        self.conn = Connection(parent.detach())
        self.conn.send_bytes(json.dumps({"op": "init", "uid": self.uid,
                                         "process_limit": "process_limit" in guarantees(mode)}).encode())
        self.ready, self.ready_lock = False, threading.Lock()

    @classmethod
    def fresh(cls, mode: str) -> _Worker:
        sbx = tempfile.mkdtemp(prefix="stagewise-sandbox-")
        os.chmod(sbx, 0o711)
        for d, perms in _WRITABLE:
            os.mkdir(f"{sbx}/{d}")
            os.chmod(f"{sbx}/{d}", perms)
        return cls(mode, sbx)

    def recycle(self) -> bool:
        """Make this zygote as good as new for the next trajectory: wait until it has killed the last block's
        processes (its answer to a ping comes after that cleanup), then empty the workspace, /tmp and /dev/shm
        (the only places the code could write) and reset their modes. False when the zygote is gone."""
        if not self.alive() or self.request({"op": "ping"}, timeout=REPLY_GRACE_S) != {"pong": True}:
            return False
        for d, perms in _WRITABLE:
            path = f"{self.sbx}/{d}"
            for entry in os.listdir(path):
                full = os.path.join(path, entry)
                if os.path.isdir(full) and not os.path.islink(full):
                    _remove_tree(full)
                else:
                    os.unlink(full)
            os.chmod(path, perms)
            if self.uid is not None:
                os.lchown(path, self.uid, self.uid)
        return True

    def wait_ready(self) -> None:
        with self.ready_lock:  # prewarm(wait=True) and a Sandbox may wait on the same spare
            self._wait_ready()

    def _wait_ready(self) -> None:
        if self.ready:
            return
        msg = None
        try:
            if self.conn.poll(READY_TIMEOUT_S):
                msg = json.loads(self.conn.recv_bytes())
        except (EOFError, OSError):
            pass
        if not (msg and msg.get("ready")):
            self.kill()
            tail = Path(f"{self.sbx}/worker.log").read_text(errors="replace")[-2000:]
            raise SandboxError(f"sandbox worker ({self.mode}) did not start; its log {self.sbx}/worker.log ends "
                               f"with:\n{tail}")
        self.ready = True

    def request(self, msg: dict, timeout: float) -> dict | None:
        """Send one request and wait for its answer; None if the zygote died or hung."""
        try:
            self.wait_ready()
            self.conn.send_bytes(json.dumps(msg).encode())
            if self.conn.poll(timeout):
                return json.loads(self.conn.recv_bytes())
        except (EOFError, OSError, SandboxError):
            pass
        return None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """Closing the socket makes the zygote kill every code process and exit; the kill is the backstop."""
        self.conn.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class _Pool:
    """Spare zygotes, started ahead so that Sandbox.__enter__ does not wait for the imports."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spares: dict[str, list[_Worker]] = {}
        self.starting: dict[str, int] = {}
        self.target = 1
        self.owner = os.getpid()

    def acquire(self, mode: str, recycle: bool = False) -> _Worker:
        """A spare zygote, or a new one. Without `recycle` a replacement spare starts at once; with it, the
        zygote comes back through `release` when its trajectory ends, and `prewarm` tops the spares up."""
        with self.lock:
            spares = self.spares.setdefault(mode, [])
            worker = spares.pop(0) if spares else None
        if worker is not None and not worker.alive():
            worker.kill()
            _remove_tree(worker.sbx)
            worker = None
        worker = worker or _Worker.fresh(mode)
        if not recycle:
            self.refill(mode)
        return worker

    def release(self, worker: _Worker, recycle: bool) -> None:
        """A trajectory is done with `worker`: keep it as a spare (wiped, `_Worker.recycle`) while the pool has
        fewer than `target`, else stop it. A zygote that starts its imports costs about a second of CPU, so a
        GRPO step of many trajectories would otherwise start one per trajectory, every step."""
        if recycle:
            with self.lock:
                room = len(self.spares.setdefault(worker.mode, [])) < self.target
            try:
                recycled = room and worker.recycle()
            except OSError as exc:
                log.warning("Sandbox: could not wipe %s for reuse (%s); starting a new one", worker.sbx, exc)
                recycled = False
            if recycled:
                with self.lock:
                    self.spares[worker.mode].append(worker)
                return
        worker.kill()
        _remove_tree(worker.sbx)

    def refill(self, mode: str) -> None:
        while True:
            with self.lock:
                have = len(self.spares.setdefault(mode, [])) + self.starting.get(mode, 0)
                if have >= self.target:
                    return
                self.starting[mode] = self.starting.get(mode, 0) + 1
            try:
                worker = _Worker.fresh(mode)
            finally:
                with self.lock:
                    self.starting[mode] -= 1
            with self.lock:
                self.spares[mode].append(worker)

    def shutdown(self) -> None:
        if os.getpid() != self.owner:  # a forked copy of the trainer does not own these
            return
        with self.lock:
            workers = [w for ws in self.spares.values() for w in ws]
            self.spares.clear()
        for worker in workers:
            worker.kill()
            _remove_tree(worker.sbx)


_POOL = _Pool()
atexit.register(_POOL.shutdown)


def prewarm(n: int, isolation: str = "auto", wait: bool = False) -> None:
    """Keep `n` spare zygotes warm (default 1); set it to the number of trajectories that start together.
    With `wait`, return once they have finished their imports."""
    if n < 0:
        raise ValueError(f"prewarm: n must be >= 0, got {n}")
    mode = resolve_isolation(isolation)
    _POOL.target = n
    with _POOL.lock:
        spares = _POOL.spares.setdefault(mode, [])
        extra, spares[n:] = spares[n:], []
    for worker in extra:
        worker.kill()
        _remove_tree(worker.sbx)
    _POOL.refill(mode)
    if wait:
        with _POOL.lock:
            spares = list(_POOL.spares.get(mode, []))
        for worker in spares:
            worker.wait_ready()


# ------------------------------------------------------------------------------------------ the Sandbox
class Sandbox:
    """A private, isolated Python executor for one trajectory. See the module docstring."""

    def __init__(self, workspace: str | os.PathLike | None, timeout_s: float = 10.0, memory_mb: int = 2048,
                 stateful: bool = False, max_output_chars: int = 8192, max_processes: int = 64,
                 max_file_mb: int = 256, isolation: str = "auto"):
        if workspace is not None and not Path(workspace).is_dir():
            raise FileNotFoundError(f"Sandbox workspace {str(workspace)!r} is not a directory")
        for name, value in (("timeout_s", timeout_s), ("memory_mb", memory_mb), ("max_output_chars",
                            max_output_chars), ("max_processes", max_processes), ("max_file_mb", max_file_mb)):
            if not value > 0:
                raise ValueError(f"Sandbox {name} must be > 0, got {value!r}")
        self.source = None if workspace is None else Path(workspace)
        self.timeout_s, self.stateful, self.max_output_chars = float(timeout_s), bool(stateful), max_output_chars
        self.limits = {"memory_mb": memory_mb, "max_processes": max_processes, "max_file_mb": max_file_mb}
        self.isolation = resolve_isolation(isolation)
        self.guarantees = guarantees(self.isolation)
        self.recycle = not self.stateful and recyclable(self.isolation)  # see `_Pool.release`
        self.workdir: Path | None = None  # host path of this trajectory's workspace copy, while entered
        self._worker: _Worker | None = None
        self._lock = threading.Lock()

    @property
    def uid(self) -> int | None:
        """The uid the code runs under while entered (None when it shares the trainer's)."""
        return None if self._worker is None else self._worker.uid

    def __enter__(self) -> Sandbox:
        if self._worker is not None:
            raise RuntimeError("Sandbox is already entered")
        worker = _POOL.acquire(self.isolation, self.recycle)
        try:
            if self.source is not None:
                shutil.copytree(self.source, worker.workspace, symlinks=True, dirs_exist_ok=True)
                os.chmod(worker.workspace, 0o755)  # copytree copied the source's mode onto the mount point
                if worker.uid is not None:
                    _chown_tree(worker.workspace, worker.uid)
            worker.wait_ready()
        except BaseException:
            worker.kill()
            _remove_tree(worker.sbx)
            raise
        self._worker, self.workdir = worker, Path(worker.workspace)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            worker, self._worker, self.workdir = self._worker, None, None
        if worker is not None:
            _POOL.release(worker, self.recycle)

    def run(self, code: str) -> ExecResult:
        if not isinstance(code, str):
            raise TypeError(f"Sandbox.run expects the code as a str, got {type(code).__name__}")
        with self._lock:
            if self._worker is None:
                raise RuntimeError("Sandbox.run() called outside its `with` block")
            start, reply = time.monotonic(), None
            try:
                if not self._worker.alive():
                    self._replace_worker()
                reply = self._worker.request({"op": "run", "code": code, "timeout_s": self.timeout_s,
                                              "stateful": self.stateful, "limits": self.limits,
                                              "max_output_chars": self.max_output_chars},
                                             timeout=self.timeout_s + REPLY_GRACE_S)
            except (SandboxError, OSError) as exc:  # a new worker could not start: this block fails, not the run
                log.warning("Sandbox: %s", exc)
            if reply is None:
                self._worker.kill()
                return ExecResult(output="[Error]:\nThe sandbox worker died while running this code; the Python "
                                  "state and all processes were reset.", error=True, timed_out=False,
                                  truncated=False, duration_s=time.monotonic() - start,
                                  exit_reason="sandbox_failure")
            return ExecResult(**reply)

    def _replace_worker(self) -> None:
        """A new zygote on the same directory: the files the trajectory wrote stay, its Python state does not."""
        old = self._worker
        old.kill()
        self._worker = _Worker(old.mode, old.sbx)
        if self._worker.uid is not None:
            _chown_tree(self._worker.workspace, self._worker.uid)
        self._worker.wait_ready()
