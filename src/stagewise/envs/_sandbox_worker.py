"""The zygote behind `stagewise.envs.sandbox.Sandbox`. Runs inside the isolation layer; the trainer never imports it.

Started as a script (`python -I _sandbox_worker.py '<json config>'`) by `sandbox.py`, it
1. (isolation "namespaces" only) isolates itself: new mount/net/pid/ipc/uts namespaces, a root built from the
   same bind layout that bubblewrap gets, loopback up, then forks the zygote as pid 1 of the new pid namespace;
2. imports the data stack once (numpy, pandas, matplotlib with Agg, ...);
3. serves blocks over the socket it inherited: one forked "kernel" process per block (stateless; the next one
   is forked right after an answer is sent) or per trajectory (stateful). A kernel drops to the sandbox uid,
   applies the rlimits, sends stdout+stderr into one pipe that the zygote drains with a character cap, and
   reports a condensed `[Error]:` traceback. After a stateless block, a timeout or a crash, the zygote SIGKILLs
   every other process in its pid namespace (without one: the kernels' process groups and the sandbox uid).

Only the stdlib is used before step 2. Protocol (JSON over multiprocessing.connection framing):
  trainer -> zygote  {"op": "init", "uid": int|null, "process_limit": bool}, then {"op": "run", ...}
  zygote -> trainer  {"ready": true, "pid": int}, then one result dict per run.
"""
from __future__ import annotations

import builtins
import codecs
import ctypes
import io
import json
import os
import resource
import select
import signal
import socket
import sys
import time
import traceback
from multiprocessing.connection import Connection

# Modules every block finds already imported (missing optional ones are skipped).
PRELOAD = ("numpy", "pandas", "matplotlib", "matplotlib.pyplot", "openpyxl", "sqlite3")

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 32, 4096, 8192, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
READ_CHUNK = 1 << 20

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src: str | None, dst: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(enc(src), enc(dst), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {src} -> {dst}")


def unshare_namespaces() -> None:
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS), "unshare")


# ------------------------------------------------------------------------------- namespaces (no bubblewrap)
def _make_target(path: str, like: str) -> None:
    if os.path.isdir(like):
        os.makedirs(path, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "a").close()


def _bind(src: str, dst: str, readonly: bool) -> None:
    _make_target(dst, src)
    _mount(src, dst, None, MS_BIND | MS_REC)
    _mount(None, dst, None, MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV | (MS_RDONLY if readonly else 0))


def _build_root(root: str, layout: list[list[str]]) -> None:
    """Apply the layout (the list `sandbox._layout` also turns into bwrap flags) under `root`."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
    for kind, src, dst in layout:
        target = root + dst
        if kind in ("ro", "rw"):
            _bind(src, target, readonly=kind == "ro")
        elif kind == "symlink":
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.symlink(src, target)
        elif kind == "dev":
            os.makedirs(target, exist_ok=True)
            _mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=64k")
            for node in DEV_NODES:
                _make_target(f"{target}/{node}", "/dev/null")
                _mount(f"/dev/{node}", f"{target}/{node}", None, MS_BIND)
            for name, to in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                             ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
                os.symlink(to, f"{target}/{name}")
            os.makedirs(f"{target}/shm", exist_ok=True)
        elif kind == "proc":
            os.makedirs(target, exist_ok=True)  # mounted by the zygote, once it is inside the new pid namespace
        else:
            raise ValueError(f"unknown layout entry {kind!r}")


def _loopback_up() -> None:
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = struct.unpack("16sH22x", fcntl.ioctl(s, 0x8913, struct.pack("16sH22x", b"lo", 0)))[1]  # SIOCGIFFLAGS
        fcntl.ioctl(s, 0x8914, struct.pack("16sH22x", b"lo", flags | 1))  # SIOCSIFFLAGS, IFF_UP


def enter_namespaces(cfg: dict) -> None:
    """Isolate this process, then fork: the child returns as pid 1 of a new pid namespace inside the new root;
    this process stays outside, waits for it and exits with its status (like bwrap's outer process)."""
    unshare_namespaces()
    _libc.sethostname(b"sandbox", 7)
    _build_root(cfg["root"], cfg["layout"])
    _loopback_up()
    pid = os.fork()
    if pid:
        os.close(cfg["fd"])  # so the trainer sees EOF as soon as the zygote dies
        _, status = os.waitpid(pid, 0)
        os._exit(1 if status else 0)
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # the outer process is single-threaded
    root = cfg["root"]
    _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.chdir(root)
    _mount(root, "/", None, MS_MOVE)
    os.chroot(".")
    os.chdir(cfg["workspace"])


# --------------------------------------------------------------------------------------------- the kernel
def _format_error(exc: BaseException, sources: dict[str, list[str]]) -> str:
    """DeepAnalyze's condensed traceback: header, failing line number and source line, `Type: message`.

    Departure: DeepAnalyze shows the outermost frame of the block; we show the innermost frame that is in the
    block (the line that failed inside a function the block defined), which is what one needs to fix it."""
    lines = ["Traceback (most recent call last):"]
    if isinstance(exc, SyntaxError):
        if exc.filename in sources and exc.lineno:
            lines.append(f'  File "{exc.filename}", line {exc.lineno}')
            lines.append("    " + (exc.text or "").strip())
        message = exc.msg
    else:
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename in sources]
        if frames:
            f = frames[-1]
            src = sources[f.filename]
            lines.append(f'  File "{f.filename}", line {f.lineno}, in {f.name}')
            if f.lineno and 1 <= f.lineno <= len(src):
                lines.append("    " + src[f.lineno - 1].strip())
        message = str(exc)
    lines.append(f"{type(exc).__name__}: {message}" if message else type(exc).__name__)
    return "[Error]:\n" + "\n".join(lines)


def _run_block(code: str, namespace: dict, filename: str, sources: dict) -> str | None:
    import linecache

    sources[filename] = code.splitlines()
    linecache.cache[filename] = (len(code), None, [ln + "\n" for ln in sources[filename]], filename)
    try:
        exec(compile(code, filename, "exec"), namespace)
    except SystemExit as exc:
        if exc.code in (None, 0):
            return None
        return _format_error(exc, sources)
    except BaseException as exc:  # noqa: BLE001 - everything the block raises is reported, nothing escapes
        return _format_error(exc, sources)
    return None


def _apply_limits(limits: dict, process_limit: bool) -> None:
    mib = 1 << 20
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_mb"] * mib,) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["max_file_mb"] * mib,) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if process_limit:
        resource.setrlimit(resource.RLIMIT_NPROC, (limits["max_processes"],) * 2)


def _kernel_main(sock_fd: int, out_fd: int, uid: int | None, process_limit: bool) -> None:
    """Forked from the zygote. Never returns."""
    os.setsid()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out_fd, 1)
    os.dup2(out_fd, 2)
    os.dup2(sock_fd, 3)
    os.closerange(4, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    # One stream object for both stdout and stderr keeps their order.
    stream = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)), encoding="utf-8",
                              errors="backslashreplace")
    sys.stdout = sys.stderr = sys.__stdout__ = sys.__stderr__ = stream
    sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
    sys.argv = ["-c"]
    sys.path.insert(0, "")  # like `python -c` and Jupyter: modules in the workspace are importable
    sys.dont_write_bytecode = True
    if "numpy" in sys.modules:  # `random` reseeds itself after fork; numpy's global RNG does not
        sys.modules["numpy"].random.seed()
    conn = Connection(3)
    me = os.getpid()
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    sources: dict[str, list[str]] = {}
    limited = False
    block = 0
    while True:
        try:
            msg = json.loads(conn.recv_bytes())
        except (EOFError, OSError):
            os._exit(0)
        if not limited:
            _apply_limits(msg["limits"], process_limit)
            limited = True
        block += 1
        filename = "<string>" if msg["one_shot"] else f"<cell-{block}>"
        error = _run_block(msg["code"], namespace, filename, sources)
        if msg["one_shot"]:  # like the end of a script: wait for the block's non-daemon threads
            _join_threads()
        if os.getpid() != me:  # a process the block forked (os.fork) got here: it must not answer
            _flush_quietly(stream)
            os._exit(0)
        _flush_quietly(stream)
        conn.send_bytes(json.dumps({"error": error}).encode())
        if msg["one_shot"]:
            os._exit(0)


def _join_threads() -> None:
    import threading

    for t in threading.enumerate():
        if t is not threading.current_thread() and not t.daemon:
            t.join()


def _flush_quietly(stream) -> None:
    try:
        stream.flush()
    except Exception:  # noqa: BLE001 - the block may have closed or broken its own stdout
        pass


# -------------------------------------------------------------------------------------------- the zygote
class _Capped:
    """Decode a byte stream as UTF-8, keep the first `limit` characters, count the rest."""

    def __init__(self, limit: int):
        self.limit, self.parts, self.kept, self.extra = limit, [], 0, 0
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, data: bytes, final: bool = False) -> None:
        text = self.decoder.decode(data, final)
        room = max(self.limit - self.kept, 0)
        if room:
            self.parts.append(text[:room])
            self.kept += min(room, len(text))
        self.extra += max(len(text) - room, 0)

    def text(self) -> str:
        head = "".join(self.parts)
        return head + (f"\n... [output truncated: {self.extra} more characters]" if self.extra else "")


def _cap(text: str, limit: int) -> tuple[str, bool]:
    capped = _Capped(limit)
    capped.feed(text.encode(), final=True)
    return capped.text(), capped.extra > 0


class _Kernel:
    def __init__(self, pid: int, conn: Connection, out: int):
        self.pid, self.conn, self.out = pid, conn, out
        self.pidfd = os.pidfd_open(pid)
        self.status: int | None = None  # wait status once reaped

    def alive(self) -> bool:
        return self.status is None and not select.select([self.pidfd], [], [], 0)[0]

    def close(self) -> None:
        for closer in (self.conn.close, lambda: os.close(self.out), lambda: os.close(self.pidfd)):
            try:
                closer()
            except OSError:
                pass


class Zygote:
    def __init__(self, conn: Connection, mode: str):
        self.conn, self.mode = conn, mode
        self.uid: int | None = None
        self.process_limit = False
        self.kernel: _Kernel | None = None  # the stateful kernel, or the pre-forked next stateless one
        self.children: dict[int, _Kernel] = {}

    # -- processes
    def fork_kernel(self) -> _Kernel:
        zsock, ksock = socket.socketpair()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                zsock.close()
                os.close(r)
                _kernel_main(ksock.fileno(), w, self.uid, self.process_limit)
            finally:
                os._exit(70)
        ksock.close()
        os.close(w)
        os.set_blocking(r, False)
        kernel = _Kernel(pid, Connection(zsock.detach()), r)
        self.children[pid] = kernel
        return kernel

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.children:
                self.children.pop(pid).status = status

    def wait_kernel(self, kernel: _Kernel) -> int:
        if kernel.status is None:
            try:
                _, kernel.status = os.waitpid(kernel.pid, 0)
            except ChildProcessError:
                kernel.status = 0
            self.children.pop(kernel.pid, None)
        return kernel.status

    def kill_user_processes(self) -> None:
        """SIGKILL every process that runs user code (kernels and whatever they spawned). Does not wait for them
        to finish dying: a process with SIGKILL pending can no longer fork, so once a pass over /proc finds no
        process it has not signalled yet, none can appear; the dead are reaped later."""
        if self.mode != "none":  # inside our own pid namespace: everything but us and pid 1 is user code
            done = {1, os.getpid()}
            while True:
                fresh = [p for p in _pids() if p not in done and not _is_zombie(p)]
                if not fresh:
                    break
                for p in fresh:
                    try:
                        os.kill(p, signal.SIGKILL)
                    except OSError:
                        pass
                done.update(fresh)
        else:
            for kernel in list(self.children.values()):  # unreaped, so their pids cannot have been reused
                try:
                    os.killpg(kernel.pid, signal.SIGKILL)
                except OSError:
                    pass
            if self.uid is not None:
                _kill_uid(self.uid)
        self.reap()

    # -- one block
    def run(self, req: dict) -> dict:
        stateful = req["stateful"]
        self.reap()
        kernel = self.kernel
        if kernel is not None and not kernel.alive():  # a stateful kernel that died between blocks
            self.wait_kernel(kernel)
            kernel.close()
            kernel = None
        kernel = kernel or self.fork_kernel()
        self.kernel = kernel if stateful else None
        capped = _Capped(req["max_output_chars"])
        start = time.monotonic()
        deadline = start + req["timeout_s"]
        kernel.conn.send_bytes(json.dumps({"code": req["code"], "limits": req["limits"],
                                           "one_shot": not stateful}).encode())
        reply, died, timed_out = None, False, False
        watch = [kernel.out, kernel.conn, kernel.pidfd, self.conn]
        while reply is None and not died:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            ready, _, _ = select.select(watch, [], [], remaining)
            if self.conn in ready:
                self.check_trainer()
            if kernel.out in ready and not self.read_into(kernel.out, capped):
                watch.remove(kernel.out)
            if kernel.conn in ready:
                try:
                    reply = json.loads(kernel.conn.recv_bytes())
                except (EOFError, OSError):
                    watch.remove(kernel.conn)
            if kernel.pidfd in ready:
                died = True
        duration = time.monotonic() - start
        if timed_out:
            self.kill_user_processes()
        while self.read_into(kernel.out, capped):  # everything written before the reply or the exit
            if time.monotonic() > deadline + 1.0:
                break
        capped.feed(b"", final=True)
        output, truncated = capped.text(), capped.extra > 0
        reset = " The Python state was reset." if stateful else ""
        if timed_out:
            error = f"[Error]:\nPython code execution timed out after {req['timeout_s']} seconds.{reset}"
            reason = "timeout"
        elif reply is not None:
            error, reason = reply["error"], ("exception" if reply["error"] else "ok")
        else:
            status = self.wait_kernel(kernel)
            if os.WIFSIGNALED(status):
                sig = signal.Signals(os.WTERMSIG(status)).name
                error, reason = f"[Error]:\nThe code process was killed by signal {sig}.{reset}", "crashed"
            elif os.waitstatus_to_exitcode(status) != 0:
                code = os.waitstatus_to_exitcode(status)
                error, reason = f"[Error]:\nThe code process exited with status {code}.{reset}", "crashed"
            else:
                error, reason = None, "ok"
        if error:
            error, cut = _cap(error, req["max_output_chars"])
            truncated = truncated or cut
            if output and not output.endswith("\n"):
                output += "\n"
            output += error
        self.finished = (kernel, stateful, timed_out or died)
        return {"output": output, "error": error is not None, "timed_out": timed_out, "truncated": truncated,
                "exit_reason": reason, "duration_s": duration}

    def finish_block(self) -> None:
        """After the answer is sent, off the latency path: clean up, and pre-fork the next stateless process."""
        kernel, stateful, broken = self.finished
        if not stateful or broken:
            self.kill_user_processes()  # the block's leftovers (background processes, forks)
            kernel.close()  # reaped later, by `reap`
            self.kernel = self.fork_kernel() if not stateful else None

    def read_into(self, fd: int, capped: _Capped) -> bool:
        """Read what is available; False at EOF or when nothing is left to read right now."""
        try:
            data = os.read(fd, READ_CHUNK)
        except OSError:  # BlockingIOError: nothing more for now
            return False
        if not data:
            return False
        capped.feed(data)
        return True

    def check_trainer(self) -> None:
        """The trainer only writes between blocks, so a readable socket during a block means it went away."""
        try:
            self.conn.recv_bytes()
        except (EOFError, OSError):
            self.shutdown()

    def shutdown(self) -> None:
        self.kill_user_processes()
        os._exit(0)

    def serve(self) -> None:
        while True:
            try:
                req = json.loads(self.conn.recv_bytes())
            except (EOFError, OSError):
                self.shutdown()
            if req["op"] == "init":
                self.uid, self.process_limit = req["uid"], req["process_limit"]
                self.kernel = self.fork_kernel()
                self.conn.send_bytes(json.dumps({"ready": True, "pid": os.getpid()}).encode())
            elif req["op"] == "run":
                self.conn.send_bytes(json.dumps(self.run(req)).encode())
                self.finish_block()
            elif req["op"] == "ping":  # answered after the last block's cleanup: its processes are killed
                self.reap()
                self.conn.send_bytes(json.dumps({"pong": True}).encode())


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return True  # gone


def _kill_uid(uid: int) -> None:
    """Without a pid namespace: a helper that becomes `uid` and SIGKILLs every process of that uid."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setresuid(uid, uid, uid)
            for _ in range(1000):
                try:
                    os.kill(-1, signal.SIGKILL)
                except ProcessLookupError:
                    break
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _preload() -> None:
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        if name == "matplotlib":
            sys.modules["matplotlib"].use("Agg")
    if "pandas" in sys.modules:  # pay pandas' lazy first-call costs once, here
        sys.modules["pandas"].read_csv(io.StringIO("k,v\na,1\nb,2\na,3\n")).groupby("k")["v"].sum().to_string()


def main(argv: list[str]) -> None:
    cfg = json.loads(argv[1])
    os.umask(0o022)
    if cfg.get("probe"):
        unshare_namespaces()
        return
    if cfg["mode"] == "namespaces":
        enter_namespaces(cfg)
    os.environ.pop("PWD", None)  # bwrap's --chdir sets it; the code gets exactly `sandbox.code_env()`
    # The control socket is the only channel to the trainer; keep our own stdout quiet.
    os.dup2(2, 1)
    _preload()
    Zygote(Connection(cfg["fd"]), cfg["mode"]).serve()


if __name__ == "__main__":
    main(sys.argv)
