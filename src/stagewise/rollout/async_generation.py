"""Asynchronous generation for GRPO (``stage.max_staleness`` = k > 0): a generator process with its own cores
generates the next batches while the trainer trains on the current one, never with weights more than k steps old.

    trainer  | train s      | push v=s+1, submit s+k+1 | train s+1    | ...
    generator|   generate s+1 (weights v >= s+1-k)      | generate s+2 | ...

The generator is a separate process (``spawn``; torch releases the GIL, but a tiny model's generation is mostly
Python, so a thread would not overlap), running the ``rollout.backend=hf`` engine on its own copy of the policy with
``stage.generator_threads`` torch threads; the trainer keeps the machine's other threads. Jobs go in step order
(the dataset rows of step ``s``); before each job the generator loads the newest pushed weights. The trainer pushes
after every step (``WeightBoard``: the policy's tensors in shared memory, a version counter and a lock) and then
submits the job for step ``s + k + 1``, so the weights a job starts from are at least version ``s + 1`` and the
batch is at most k versions old when step ``s + k + 1`` trains on it (the staleness bound holds by construction;
the trainer checks it). Versions count GRPO steps (one push per step); with ``updates_per_step`` > 1 a version
spans that many optimizer steps.

Departures from peers: a job runs whole on the weights it started with (no in-flight update, unlike PipelineRL's
and verl's partial rollouts): a request that would straddle a push is counted one version staler instead; versions
are per trajectory, not per token. Reproducibility: which version a job starts from depends on timing, so two runs
with k > 0 differ (k = 0 is the synchronous loop, bit for bit: this module is not used).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import signal
import time
from typing import Any, Dict, List, Optional

import torch
import torch.multiprocessing as mp

log = logging.getLogger(__name__)

_POLL_S = 1.0  # how often a waiting generator checks that the trainer is still alive


class WeightBoard:
    """The policy's weights in shared memory with a version: the trainer `publish`es after a step, the generator
    `load_into`s its copy before a job; the tensors are the trainer's state dict. Names that share one tensor (tied
    input and output embeddings) share one board tensor, copied once per push."""

    def __init__(self, state_dict: Dict[str, torch.Tensor], version: int):
        self.tensors: Dict[str, torch.Tensor] = {}
        self.unique: List[str] = []  # one name per distinct tensor: what `publish` copies
        seen: Dict[tuple, torch.Tensor] = {}
        for name, t in state_dict.items():
            key = (t.data_ptr(), tuple(t.shape))  # tied weights: the same memory under two names
            if key not in seen:
                seen[key] = t.detach().to("cpu", copy=True).contiguous().share_memory_()
                self.unique.append(name)
            self.tensors[name] = seen[key]
        self.version = mp.get_context("spawn").Value("q", int(version))
        self.lock = mp.get_context("spawn").Lock()

    def publish(self, state_dict: Dict[str, torch.Tensor], version: int) -> None:
        with self.lock, torch.no_grad():
            for name in self.unique:
                self.tensors[name].copy_(state_dict[name].detach())
            self.version.value = int(version)

    def load_into(self, model: torch.nn.Module, have: int) -> int:
        """Copy the board into ``model`` when it holds a newer version than ``have``; the version ``model`` has now."""
        if self.version.value == have:
            return have
        with self.lock, torch.no_grad():
            model.load_state_dict(self.tensors, strict=True)
            return int(self.version.value)


@dataclasses.dataclass
class Generated:
    """One job's result: the batch for step ``step``, generated on weights of version ``version``."""

    step: int
    rows: List[int]
    version: int
    batch: Any  # RolloutBatch
    generate_s: float  # the generator's time on this job
    idle_s: float  # how long the generator waited for this job after finishing the previous one
    load_s: float  # loading newer weights before the job


def _generator_main(cfg, board: WeightBoard, jobs, results, threads: int, parent: int) -> None:
    """The generator process: build the policy copy and the engine, then serve jobs until told to stop."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):  # the trainer decides when the run stops
        signal.signal(sig, signal.SIG_IGN)
    torch.set_num_threads(threads)
    from stagewise.models import load_model_and_tokenizer
    from stagewise.rollout import build_generator, generate

    try:
        torch.manual_seed(int(cfg.seed) + 1)  # its own sampling stream (the trainer's stays as in a sync run)
        model, tokenizer = load_model_and_tokenizer(cfg.model)
        version = board.load_into(model, have=-1)
        model.eval()
        generator = build_generator(cfg, model, tokenizer, return_logprobs=True)
        results.put(("ready", None))
        idle_since = time.perf_counter()
        while True:
            try:
                job = jobs.get(timeout=_POLL_S)
            except queue.Empty:
                if os.getppid() != parent:  # the trainer died (kill -9): do not outlive it
                    return
                continue
            if job is None:
                break
            step, rows, columns = job
            start = time.perf_counter()
            idle = start - idle_since
            version = board.load_into(model, have=version)
            loaded = time.perf_counter()
            with torch.no_grad():
                batch = generate(generator, columns)
            idle_since = time.perf_counter()
            results.put(("batch", Generated(step=step, rows=rows, version=version, batch=batch,
                                            generate_s=idle_since - loaded, idle_s=idle, load_s=loaded - start)))
        generator.close()
    except BaseException as e:  # noqa: BLE001 - reported to the trainer, which raises it
        import traceback

        results.put(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


class AsyncGenerator:
    """The trainer's side: start the generator process, `submit` jobs in step order, `take` their batches in the same
    order, `publish` weights after each step, `close` at the end (also called at exit: the process is a daemon).
    The process starts (imports, loads its model) while the trainer goes on (its step-0 eval); the first `take`
    waits for it, at most ``start_timeout_s``."""

    def __init__(self, cfg, policy: torch.nn.Module, version: int, threads: int, start_timeout_s: float = 600.0):
        ctx = mp.get_context("spawn")
        self.board = WeightBoard(policy.state_dict(), version)
        self.jobs, self.results = ctx.Queue(), ctx.Queue()
        self.pending: List[int] = []
        self.started, self.start_timeout_s = False, start_timeout_s
        self.process = ctx.Process(target=_generator_main, name="stagewise-generator", daemon=True,
                                   args=(cfg, self.board, self.jobs, self.results, int(threads), os.getpid()))
        self.process.start()

    def _wait_started(self) -> None:
        if not self.started:
            kind, payload = self._get(self.start_timeout_s)
            if kind != "ready":
                raise RuntimeError(f"the generator process did not start: {payload}")
            self.started = True

    def _get(self, timeout_s: Optional[float] = None):
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:
                kind, payload = self.results.get(timeout=_POLL_S)
            except queue.Empty:
                if not self.process.is_alive():
                    raise RuntimeError(f"the generator process died (exit code {self.process.exitcode})") from None
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"the generator process gave nothing in {timeout_s:.0f} s") from None
                continue
            if kind == "error":
                raise RuntimeError(f"the generator process failed: {payload}")
            return kind, payload

    def submit(self, step: int, rows: List[int], columns: Dict[str, list]) -> None:
        self.jobs.put((step, [int(r) for r in rows], columns))
        self.pending.append(step)

    def take(self) -> Generated:
        """The oldest submitted job's batch (blocks until it is there)."""
        self._wait_started()
        _, got = self._get()
        expected = self.pending.pop(0)
        if got.step != expected:
            raise RuntimeError(f"the generator returned step {got.step}, expected {expected}")
        return got

    def publish(self, policy: torch.nn.Module, version: int) -> None:
        self.board.publish(policy.state_dict(), version)

    def close(self) -> None:
        if self.process.is_alive():
            self.jobs.put(None)
            self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=10)


def trainer_threads(generator_threads: int) -> int:
    """The torch threads the trainer keeps beside a generator with ``generator_threads`` (at least 1)."""
    return max(1, torch.get_num_threads() - int(generator_threads))


__all__ = ["AsyncGenerator", "Generated", "WeightBoard", "trainer_threads"]
