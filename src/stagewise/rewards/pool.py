"""A process pool with a hard per-task deadline, for rewards that can hang (sympy, math-verify's LaTeX parser).

Why not ``concurrent.futures.ProcessPoolExecutor``: ``future.result(timeout)`` only stops *waiting*; the hung task
keeps its worker forever, and killing that worker breaks the whole executor. Here each worker runs one task at a
time; a worker that overruns its deadline (or dies) is killed and replaced, its task reported as failed, and the
other tasks carry on. (SIGALRM inside the worker is not enough on its own: it cannot interrupt a long C call such as
a huge integer power, and math-verify's own alarms reset any outer one.)

Workers are fresh interpreters (``python -c "...serve(fd)"``) talking over a socket pair, not multiprocessing
children: they never re-import the trainer's ``__main__`` (so an unguarded script cannot fork-bomb, and workers do
not pay for torch), and never fork a parent that holds threads or CUDA state. A worker receives the parent's
``sys.path`` (so ``my_pkg.mod:fn`` rewards import the same way), imports ``stagewise.rewards``, scores one math
answer with math-verify and one with sympy (their first call pays lazy imports, over 2 s on a busy machine, which
would otherwise trip the first samples' time limits), and only then says it is ready: start-up is not charged to
any task. Workers ignore SIGINT (the parent owns Ctrl-C) and exit when the parent closes the socket or dies.
A worker that dies before it is ready is a configuration error and raises ``RewardPoolError``.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import weakref
from collections import deque
from multiprocessing.connection import Connection, wait
from typing import Any, Dict, List, Sequence, Tuple

Task = Tuple[str, Tuple[str, Dict[str, Any]], str, Dict[str, Any]]  # (cache key, (name, params), completion, row)
STARTUP_TIMEOUT_S = 180.0


class RewardPoolError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------- worker side
_WARM = False


def warm_up() -> None:
    """Score one math answer with math-verify and one with sympy (once per process)."""
    global _WARM
    if _WARM:
        return
    from stagewise.rewards.math import grade_answer, is_correct

    is_correct("\\boxed{\\frac{1}{2}}", ["0.5"])
    grade_answer("\\sqrt{12}", "2\\sqrt{3}", timeout_s=None)
    _WARM = True


def _exit_with_parent(parent: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(0)


def serve(fd: int) -> None:
    """Worker entry point: receive ``{"sys_path"}``, warm up, send "ready", then answer tasks until EOF/None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    conn = Connection(fd)
    init = conn.recv()
    sys.path[:] = init["sys_path"]
    warm_up()
    from stagewise.rewards import build
    from stagewise.rewards.base import run_one

    conn.send("ready")
    built: Dict[str, Any] = {}
    while True:
        try:
            task = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        if task is None:
            return
        key, (name, params), completion, row = task
        try:
            if key not in built:
                built[key] = build(name, **params)
            outcome = run_one(built[key], completion, row)
        except Exception:
            outcome = (False, traceback.format_exc())
        try:
            conn.send(outcome)
        except (pickle.PicklingError, TypeError, AttributeError):
            conn.send((False, traceback.format_exc()))


# --------------------------------------------------------------------------------------------- parent side
class _Worker:
    def __init__(self) -> None:
        parent_sock, child_sock = socket.socketpair()
        fd = child_sock.fileno()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", f"from stagewise.rewards.pool import serve; serve({fd})"], pass_fds=[fd])
        child_sock.close()
        self.conn = Connection(parent_sock.detach())
        self.conn.send({"sys_path": list(sys.path)})
        self.started = time.monotonic()
        self.ready = False

    def stop(self, grace_s: float = 0.0) -> None:
        """Ask a ready worker to exit (it is idle between runs), kill it after ``grace_s``; kill others at once."""
        if grace_s > 0 and self.ready and self.proc.poll() is None:
            try:
                self.conn.send_bytes(pickle.dumps(None))
                self.proc.wait(grace_s)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.conn.close()


def _shutdown(workers: List[_Worker]) -> None:
    for worker in workers:
        worker.stop(grace_s=0.5)
    workers.clear()


class WorkerPool:
    """``run(tasks, timeout_s)`` returns one ``(ok, value_or_traceback)`` per task, in order. Workers start on first
    use and live until ``close()`` (or garbage collection / interpreter exit).

    Each worker has up to ``PIPELINE_DEPTH`` tasks queued, so it starts the next one without waiting for the parent
    to be scheduled (on a busy machine a round trip can cost more than a sample). The deadline runs for the task at
    the head of a worker's queue, from when it reaches the head; on a timeout or a crash the head task fails and the
    ones queued behind it go back to the pool. Only small tasks (< 64 KiB pickled) are queued behind another, so a
    send can never block on a worker that is stuck."""

    PIPELINE_DEPTH = 2
    QUEUE_BYTES = 64 * 1024

    def __init__(self, num_workers: int) -> None:
        self.num_workers = max(1, int(num_workers))
        self._workers: List[_Worker] = []
        self._ready: Dict[Connection, _Worker] = {}
        self._starting: Dict[Connection, _Worker] = {}
        self._lock = threading.Lock()
        self.restarts = 0  # workers replaced after a timeout or a crash
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)

    def _start(self) -> None:
        worker = _Worker()
        self._workers.append(worker)
        self._starting[worker.conn] = worker

    def _restart(self, worker: _Worker) -> None:
        self._ready.pop(worker.conn, None)
        worker.stop()
        self._workers.remove(worker)
        self.restarts += 1
        self._start()

    def _reset(self) -> None:
        _shutdown(self._workers)
        self._ready.clear()
        self._starting.clear()

    def run(self, tasks: Sequence[Task], timeout_s: float) -> List[Tuple[bool, Any]]:
        with self._lock:
            try:
                return self._run(tasks, timeout_s)
            except BaseException:
                self._reset()  # never leave a task in flight behind: its late answer would desync the protocol
                raise

    def _run(self, tasks: Sequence[Task], timeout_s: float) -> List[Tuple[bool, Any]]:
        while len(self._workers) < min(self.num_workers, len(tasks)):
            self._start()
        results: List[Tuple[bool, Any]] = [(False, "not run")] * len(tasks)
        payloads: Dict[int, bytes] = {}
        todo = deque(range(len(tasks)))
        queues: Dict[Connection, deque] = {}  # task indices sent to each worker, oldest first
        head_deadline: Dict[Connection, float] = {}

        def fail_worker(conn: Connection, message: str) -> None:
            queue = queues.pop(conn)
            results[queue.popleft()] = (False, message)
            todo.extendleft(reversed(queue))  # the tasks queued behind it were never started: run them elsewhere
            self._restart(self._ready[conn])

        while todo or any(queues.values()):
            for conn, worker in list(self._ready.items()):
                queue = queues.setdefault(conn, deque())
                while todo and len(queue) < self.PIPELINE_DEPTH:
                    i = todo[0]
                    if i not in payloads:
                        try:
                            payloads[i] = pickle.dumps(tasks[i], protocol=pickle.HIGHEST_PROTOCOL)
                        except (pickle.PicklingError, TypeError, AttributeError):
                            results[todo.popleft()] = (False, traceback.format_exc())
                            continue
                    if queue and len(payloads[i]) > self.QUEUE_BYTES:
                        break
                    try:
                        conn.send_bytes(payloads[i])
                    except OSError:  # the worker died while idle: replace it, the task stays in todo
                        todo.extendleft(reversed(queues.pop(conn)))
                        self._restart(worker)
                        break
                    todo.popleft()
                    if not queue:
                        head_deadline[conn] = time.monotonic() + timeout_s
                    queue.append(i)
            active = [conn for conn, queue in queues.items() if queue]
            deadlines = [head_deadline[conn] for conn in active]
            deadlines += [w.started + STARTUP_TIMEOUT_S for w in self._starting.values()]
            timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else 0.0
            ready = wait(active + list(self._starting), timeout=timeout)
            for conn in ready:
                if conn in self._starting:
                    worker = self._starting.pop(conn)
                    try:
                        conn.recv()
                    except (EOFError, OSError):
                        worker.proc.wait()
                        raise RewardPoolError(
                            f"a reward worker exited with code {worker.proc.returncode} while starting (its error is "
                            f"on stderr above); command: {' '.join(worker.proc.args)}") from None
                    worker.ready = True
                    self._ready[conn] = worker
                    continue
                try:
                    outcome = conn.recv()
                except (EOFError, OSError):
                    code = self._ready[conn].proc.wait()
                    fail_worker(conn, f"RewardWorkerDied: the worker exited (code {code}) while scoring this sample")
                    continue
                queue = queues[conn]
                results[queue.popleft()] = outcome
                if queue:
                    head_deadline[conn] = time.monotonic() + timeout_s
            now = time.monotonic()
            for conn in [c for c, queue in queues.items() if queue and now >= head_deadline[c]]:
                fail_worker(conn, f"RewardTimeout: no result within {timeout_s:g}s; worker killed")
            for worker in self._starting.values():
                if now >= worker.started + STARTUP_TIMEOUT_S:
                    raise RewardPoolError(f"a reward worker did not start within {STARTUP_TIMEOUT_S:g}s")
        return results

    def close(self) -> None:
        with self._lock:
            self._reset()
