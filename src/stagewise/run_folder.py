"""The run folder: one per run, the same for every rank of a distributed run.

Layout::

    outputs/<task>/<run-id>/
      .hydra/config.yaml        resolved config (written by Hydra; secrets are never config values)
      metrics.jsonl             one object per logged step
      samples/step_<N>.parquet  rollouts
      checkpoints/step_<N>/     HF weights + optimizer/scheduler/dataloader/RNG state
      final/                    HF-loadable model and tokenizer
      train.log                 (rank 0; other ranks write train.rank<R>.log)

Why a custom run id instead of ``${now:}``: under ``torchrun``/``accelerate launch`` every rank runs ``train.py``
itself and would resolve ``${now:}`` separately, possibly a second apart, giving one folder per rank. The id is
taken, in order, from ``$STAGEWISE_RUN_ID`` (set by our own relauncher and by pipelines), from the SLURM job id,
from the start time of the launcher process that all local ranks share (their parent), or from the clock; it is
then exported so that any child process inherits it.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import secrets
import shutil
from pathlib import Path

from omegaconf import OmegaConf

RUN_ID_ENV = "STAGEWISE_RUN_ID"


def _process_start_time(pid: int) -> float | None:
    """Start time (seconds since the epoch) of a Linux process, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return boot + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, StopIteration):
        return None


def _stamp(t: float) -> str:
    return _dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d_%H-%M-%S")


def make_run_id() -> str:
    if os.environ.get(RUN_ID_ENV):
        return os.environ[RUN_ID_ENV]
    if os.environ.get("SLURM_JOB_ID"):
        job = os.environ["SLURM_JOB_ID"]
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        run_id = f"slurm-{job}" + (f"_{task}" if task else "")
    elif "LOCAL_RANK" in os.environ:  # launched by torchrun/accelerate without our relauncher
        ppid = os.getppid()
        start = _process_start_time(ppid)
        run_id = f"{_stamp(start) if start else 'dist'}_{ppid:x}"
    else:
        run_id = f"{_stamp(_dt.datetime.now().timestamp())}_{secrets.token_hex(2)}"
    os.environ[RUN_ID_ENV] = run_id
    return run_id


def rank() -> int:
    """Global rank before torch.distributed exists: torchrun (RANK), SLURM tasks (SLURM_PROCID), or submitit's
    local executor (SUBMITIT_LOCAL_GLOBALID); Hydra names the log file from it before the job body runs."""
    for var in ("RANK", "SLURM_PROCID", "SUBMITIT_LOCAL_GLOBALID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def log_file_name() -> str:
    r = rank()
    return "train.log" if r == 0 else f"train.rank{r}.log"


def register_resolvers() -> None:
    for name, fn in (("stagewise_run_id", make_run_id), ("stagewise_log_file", log_file_name)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn, use_cache=True)


class RunFolder:
    """Paths inside one run folder. Creating it is idempotent; only rank 0 should write shared files."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def final(self) -> Path:
        return self.root / "final"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step_{step}"

    def sample_file(self, step: int) -> Path:
        return self.samples / f"step_{step}.parquet"

    def list_checkpoints(self) -> list[Path]:
        """Complete checkpoints (those with a ``COMPLETE`` marker), oldest first."""
        if not self.checkpoints.exists():
            return []
        done = [p for p in self.checkpoints.glob("step_*") if (p / "COMPLETE").exists()]
        return sorted(done, key=lambda p: int(p.name.split("_")[1]))

    def latest_checkpoint(self) -> Path | None:
        found = self.list_checkpoints()
        return found[-1] if found else None

    def previous_run(self) -> list[str]:
        """What an earlier run left here that a new run would mix with: complete checkpoints, ``final/``, logged
        metrics, samples."""
        found = [f"checkpoints/{p.name}" for p in self.list_checkpoints()]
        if self.final.exists():
            found.append("final/")
        if self.metrics.exists() and self.metrics.stat().st_size > 0:
            found.append("metrics.jsonl")
        if self.samples.exists() and any(self.samples.iterdir()):
            found.append("samples/")
        return found

    def finished(self) -> bool:
        """The run wrote its end: ``final/`` (vocab, sft, grpo; its config is written with the weights) or
        ``result.json`` (rejection sampling, eval). A rerun with ``resume=auto`` then has nothing to do."""
        return (self.final / "config.json").exists() or (self.root / "result.json").exists()

    def prepare_for(self, resume: str) -> None:
        """``resume=never`` refuses a folder that holds a run (a fresh run would mix its steps, checkpoints and
        ``final/`` with the old ones); ``resume=overwrite`` deletes what the old run left first. ``auto`` and a
        checkpoint path continue it. Call once per run (rank 0, before training starts)."""
        if resume not in ("never", "overwrite"):
            return
        found = self.previous_run()
        if not found:
            return
        if resume == "never":
            raise RunFolderInUseError(
                f"{self.root} already holds a run ({', '.join(found)}); resume=never would mix a new run into it. "
                f"Use another run_id, resume=auto to continue it, or resume=overwrite to delete it first")
        for path in (self.checkpoints, self.final, self.samples, self.metrics):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        logging.getLogger("stagewise").info("resume=overwrite: deleted the previous run's %s", ", ".join(found))


class RunFolderInUseError(RuntimeError):
    """``resume=never`` on a run folder that holds a run."""
