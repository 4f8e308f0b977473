"""Metric sinks: console, metrics.jsonl, W&B, TensorBoard, chosen by ``logger.sinks``.

Only the main process writes. Every record in metrics.jsonl is ``{"step", "stage", ...metrics}`` with plain
floats. Secrets never reach a tracker: the config holds env-var names, not keys, and the values of those variables
are masked (``stagewise.tracking.logs``) in string metrics, the W&B config and every log line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from tqdm.auto import tqdm

from stagewise.config import TrainConfig
from stagewise.hydra_config import config_dict
from stagewise.tracking.alerts import TrendAlerts
from stagewise.tracking.logs import install_redaction, redact

log = logging.getLogger("stagewise")

SINKS = ("console", "jsonl", "wandb", "tensorboard")


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # json has no NaN/inf; keep them visible as strings
    return v


def format_metrics_line(step: int, metrics: Mapping[str, Any]) -> str:
    parts = [f"step {step:>5}"]
    for k, v in metrics.items():
        v = _plain(v)
        parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    return " | ".join(parts)


class Tracker:
    """Fan metrics out to the configured sinks. ``console_formatter(step, metrics) -> str`` customises the console.

    ``resume_step``: the step the loop (re)starts from (its checkpoint's step, 0 for a fresh start). Records of this
    stage logged after that step by an earlier, killed attempt are dropped from metrics.jsonl before anything is
    appended, so that after a resume the file holds every step once (the steps between the last checkpoint and the
    kill are replayed, and logged again)."""

    def __init__(self, cfg: TrainConfig, run_dir: str | os.PathLike, *, stage: str, is_main: bool = True,
                 console_formatter: Callable[[int, Mapping[str, Any]], str] | None = None,
                 resume_step: int | None = None):
        self.stage = stage
        self.is_main = is_main
        self.run_dir = Path(run_dir)
        self.console_formatter = console_formatter or format_metrics_line
        self.alerts = TrendAlerts.from_config(cfg.logger.alerts)
        sinks = list(cfg.logger.sinks)
        unknown = [s for s in sinks if s not in SINKS]
        if unknown:
            raise ValueError(f"logger.sinks has unknown sink(s) {unknown}; choose from {list(SINKS)}")
        self.sinks = sinks if is_main else []
        install_redaction(cfg)  # the config's secrets are masked in every record and log line
        self._jsonl = None
        self._wandb = None
        self._tb = None
        if not self.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if "jsonl" in sinks:
            if resume_step is not None:
                truncate_metrics(self.run_dir / "metrics.jsonl", stage, resume_step)
            self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if "wandb" in sinks:
            import wandb

            self._wandb = wandb.init(
                project=cfg.logger.project,
                entity=cfg.logger.wandb_entity,
                name=f"{cfg.task_name}/{cfg.run_id}",
                id=str(cfg.run_id).replace("/", "-") + f"-{stage}",
                resume="allow",
                dir=str(self.run_dir),
                **({"mode": cfg.logger.wandb_mode} if cfg.logger.wandb_mode else {}),  # else $WANDB_MODE decides
                config=redact(config_dict(cfg)),  # ${oc.env:..} resolves to the value
                tags=list(cfg.tags),
            )
        if "tensorboard" in sinks:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def log(self, metrics: Mapping[str, Any], step: int, console: bool = True) -> None:
        """One record to every sink; ``console=False`` leaves the console out (GRPO records every step in the files
        and prints a summary of the logging window with `show`)."""
        if not self.is_main:
            return
        clean = {k: redact(_plain(v)) for k, v in metrics.items()}
        clean.update(self.alerts.check(clean, step))  # trend alerts are printed and logged with the record
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, "stage": self.stage, "time": time.time(), **clean}) + "\n")
        if console and "console" in self.sinks:
            log.info(self.console_formatter(step, clean))
        numeric = {k: v for k, v in clean.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)

    def show(self, metrics: Mapping[str, Any], step: int) -> None:
        """``metrics`` on the console only (the console sink's format), written to no file."""
        if self.is_main and "console" in self.sinks:
            log.info(self.console_formatter(step, {k: redact(_plain(v)) for k, v in metrics.items()}))

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", enabled: bool = True,
             initial: int = 0, stream=None):
    """A tqdm bar on the main process only (disabled elsewhere, when logger.progress_bar is false, and when the
    terminal's stream is not a terminal: a redirected log would get bar fragments). While it is shown, log lines
    print above it (never glued to it); `close` ends that."""
    stream = stream if stream is not None else sys.stderr
    shown = enabled and stream.isatty()
    bar = tqdm(iterable, total=total, desc=desc, disable=not shown, initial=initial, dynamic_ncols=True, leave=False,
               file=stream)
    if shown:
        from tqdm.contrib.logging import logging_redirect_tqdm

        redirect = contextlib.ExitStack()  # closing twice restores the logging handlers once
        redirect.enter_context(logging_redirect_tqdm(tqdm_class=tqdm))
        redirect.callback(bar.close)
        bar.close = redirect.close
    return bar


def truncate_metrics(path: str | os.PathLike, stage: str, after_step: int) -> int:
    """Drop the records of ``stage`` with ``step > after_step`` (and a torn last line) from a metrics.jsonl, in
    place (atomically: a new file replaces the old). Returns how many records were dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # torn by a kill mid-write
                dropped += 1
                continue
            raise ValueError(f"{path}:{i + 1} is not valid JSON; cannot resume appending to it") from None
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, (int, float)) and record.get("stage", stage) == stage and step > after_step:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        tmp.replace(path)
        log.info("metrics.jsonl: dropped %d record(s) of stage %s logged after step %d by the interrupted attempt "
                 "(those steps run again)", dropped, stage, after_step)
    return dropped


def read_metrics(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
