"""Preemption: SIGUSR1, SIGTERM or SIGINT (Ctrl-C) -> checkpoint at the next step boundary -> exit for requeue ->
resume=auto. A second Ctrl-C stops at once, without the checkpoint.

The signal handler only sets a flag (nothing else is safe to do in the middle of a step). The loops install it
right before their training loop (so a SIGTERM during setup still stops the process at once) and call
``checkpoint_and_exit_if_preempted(acc, save)`` once per optimizer step, after the step's bookkeeping: it agrees
across ranks whether any rank was signalled (one all-reduce of one number; a signal may reach only some ranks, and
a checkpoint is a collective), and if so every rank runs ``save()`` and the process exits with
``REQUEUE_EXIT_CODE``. The rerun of the same run folder resumes from that checkpoint (``resume=auto``).

Who sends what, and who requeues:
  * ``launchers/slurm/multinode.sbatch``: SLURM sends SIGUSR1 to the batch shell 600 s (``--signal=B:USR1@600``)
    before the time limit; the shell forwards SIGTERM to srun -> ``accelerate launch``/torchrun on each node ->
    every rank, waits, and runs ``scontrol requeue`` (same job id -> same run folder ``slurm-<id>``).
  * submitit (``hydra/launcher=slurm``): submitit installed its own handler for its preemption signal (USR2 unless
    ``$SUBMITIT_PREEMPT_SIGNAL`` says otherwise) that pickles the job and requeues it. We take that signal too and
    chain: after our checkpoint we call the handler we replaced, so submitit still requeues, but only once the
    checkpoint is on disk.
  * SLURM preemption (``PreemptMode=REQUEUE``) sends SIGTERM to every task; SLURM requeues by itself.
  * By hand / in tests: ``kill -USR1 <pid>`` and rerun the same command with ``run_id=<id>``.

The flag is read at step boundaries only: a step plus a checkpoint must fit in the warning time (600 s in the
sbatch script, ``signal_delay_s`` = 300 s in the submitit presets). A signal that arrives after the last step lets
the run finish normally.

Why 75: ``EX_TEMPFAIL`` from sysexits.h, "temporary failure, the user is invited to retry". torchrun reports any
non-zero worker exit as a failure of its own (exit 1), so wrappers decide to requeue from the signal they saw, and
the code is for plain single-process runs and for humans reading ``$?``.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any, Callable, Iterable, Optional

log = logging.getLogger(__name__)

REQUEUE_EXIT_CODE = 75
DEFAULT_SIGNALS = ("SIGUSR1", "SIGTERM", "SIGINT")


def _signal(name_or_num) -> signal.Signals:
    if isinstance(name_or_num, int):
        return signal.Signals(name_or_num)
    name = str(name_or_num).upper()
    return signal.Signals[name if name.startswith("SIG") else "SIG" + name]


def submitit_preempt_signal() -> Optional[signal.Signals]:
    """The signal submitit's requeue handler listens to, when this process is a submitit job."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    return _signal(os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))


class PreemptionHandler:
    """Record that a preemption signal arrived. Install once per process, in the main thread."""

    def __init__(self, signals: Iterable[Any] = DEFAULT_SIGNALS):
        self.signals = [_signal(s) for s in signals]
        extra = submitit_preempt_signal()
        if extra is not None and extra not in self.signals:
            self.signals.append(extra)
        self.received: Optional[signal.Signals] = None
        self._previous: dict[signal.Signals, Any] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def install(self) -> "PreemptionHandler":
        for sig in self.signals:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()

    def _on_signal(self, signum: int, frame) -> None:
        first = self.received is None
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now
        self.received = signal.Signals(signum)
        if first:  # os.write: no locks, safe whatever the signal interrupted
            again = " (Ctrl-C again to stop now, without it)" if signum == signal.SIGINT else ""
            os.write(2, f"\n[stagewise] got {self.received.name}: will checkpoint at the next step boundary and exit "
                        f"with code {REQUEUE_EXIT_CODE}{again}\n".encode())

    def chain_previous(self) -> None:
        """Hand the signal to the handler we replaced (submitit's requeue) now that the checkpoint is saved."""
        prev = self._previous.get(self.received) if self.received is not None else None
        if callable(prev) and prev is not signal.default_int_handler:  # Python's Ctrl-C handler would raise
            # submitit's handler requeues on global rank 0, then exits with its own code
            prev(int(self.received), None)


_handler: Optional[PreemptionHandler] = None


def install_preemption_handler(signals: Iterable[Any] = DEFAULT_SIGNALS) -> PreemptionHandler:
    """Install (once per process) the handler for SIGUSR1, SIGTERM, SIGINT and, under submitit, submitit's
    signal."""
    global _handler
    if _handler is None:
        _handler = PreemptionHandler(signals).install()
        log.info("preemption: %s -> checkpoint at the next step boundary, exit %d",
                 "/".join(s.name for s in _handler.signals), REQUEUE_EXIT_CODE)
    return _handler


def uninstall_preemption_handler() -> None:
    global _handler
    if _handler is not None:
        _handler.uninstall()
        _handler = None


def should_checkpoint_and_exit(acc=None) -> bool:
    """True when this process (``acc=None``) or, given an Accelerator, any rank received a preemption signal.
    With an Accelerator every rank must call it at the same point (it is a collective)."""
    local = _handler is not None and _handler.requested
    if acc is None or acc.num_processes == 1:
        return local
    import torch

    flag = torch.tensor([1.0 if local else 0.0], device=acc.device)
    return bool(acc.reduce(flag, reduction="sum").item() > 0)


def exit_for_requeue() -> None:
    """Let submitit requeue (if it installed a handler for this signal; it then exits with the code its executor
    expects), else exit with REQUEUE_EXIT_CODE."""
    if _handler is not None:
        _handler.chain_previous()
    sys.stdout.flush()
    sys.stderr.flush()
    raise SystemExit(REQUEUE_EXIT_CODE)


def checkpoint_and_exit_if_preempted(acc, save: Callable[[], Any]) -> None:
    """The step-boundary call. If any rank was signalled: every rank calls ``save()`` (the loop's checkpoint, a
    collective), then exits for requeue. Otherwise returns at once."""
    if not should_checkpoint_and_exit(acc):
        return
    log.warning("preemption requested: saving a checkpoint, then exiting with code %d", REQUEUE_EXIT_CODE)
    save()
    run_id = os.environ.get("STAGEWISE_RUN_ID", "")
    if "/" in run_id:  # a pipeline's stage: the pipeline is what the user reruns
        log.warning("checkpoint saved; to resume, rerun the pipeline with run_id=%s", run_id.split("/")[0])
    else:
        log.warning("checkpoint saved; to resume, rerun the same command%s", f" with run_id={run_id}" if run_id else "")
    if acc is not None:
        acc.wait_for_everyone()
        # tear the process group down before exiting: a rank still inside gloo's threads when its peer has gone
        # aborts ("terminate called without an active exception", SIGABRT), which turns the requeue code into a crash
        acc.state.destroy_process_group()
    exit_for_requeue()
