"""Early stopping on an eval metric with patience, keeping the best model
(as HF Trainer's EarlyStoppingCallback with load_best_model_at_end).

    stage.early_stopping_metric=eval/accuracy     # any key the stage's eval logs (eval/loss, eval/pass@4 ...)
    stage.early_stopping_patience=3               # evals in a row without improvement before stopping; 0 = never
    stage.early_stopping_mode=auto                # auto: min for a metric whose name contains "loss", else max
    stage.early_stopping_min_delta=0.0            # an improvement must beat the best by more than this

Every eval (SFT and GRPO call `EarlyStopping.after_eval`; GRPO's step-0 eval counts as the baseline) is one
observation of the pure rule `decide`. On an improvement the model is written to ``<run>/best/`` (HF-loadable,
with ``best.json``: step, metric, value); with LoRA it holds the adapter. The decision state lives in the
checkpoint (``trainer_state.json`` -> ``extra.early_stopping``), so a resumed run decides exactly as an
uninterrupted one.

When the run ends, early stopped or not, ``final/`` is the *best* model, not the last one (HF Trainer's
``load_best_model_at_end``): a pipeline's next stage starts from it. ``final/early_stopping.json`` records the best
step and value and whether training stopped early. Without a LoRA adapter ``final/`` is a hard-linked copy of
``best/`` (no extra disk); with one, the best adapter is loaded back and merged as usual. The last weights survive
only in a checkpoint saved at the last step. Without ``early_stopping_metric`` nothing here runs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

log = logging.getLogger(__name__)

STATE_KEY = "early_stopping"


@dataclass(frozen=True)
class StopState:
    best: Optional[float] = None
    best_step: Optional[int] = None
    bad_evals: int = 0  # evals in a row without improvement
    last_step: Optional[int] = None
    stopped: bool = False


def resolve_mode(metric: str, mode: str) -> str:
    if mode == "auto":
        return "min" if "loss" in metric else "max"
    if mode not in ("min", "max"):
        raise ValueError(f"stage.early_stopping_mode={mode!r} is not one of auto, min, max")
    return mode


def decide(state: StopState, value: float, step: int, *, mode: str, patience: int,
           min_delta: float = 0.0) -> tuple[StopState, bool]:
    """One eval: ``(new state, improved)``. Improved: the first finite value, or better than the best by more than
    ``min_delta``. NaN never improves. ``new_state.stopped`` once ``patience`` (> 0) evals in a row did not improve.
    A second observation of the same step (an end-of-run eval right after a periodic one) changes nothing."""
    if state.last_step is not None and step == state.last_step:
        return state, False
    finite = value is not None and math.isfinite(value)
    if finite and state.best is None:
        improved = True
    elif finite:
        improved = value < state.best - min_delta if mode == "min" else value > state.best + min_delta
    else:
        improved = False
    if improved:
        return StopState(best=float(value), best_step=step, bad_evals=0, last_step=step), True
    bad = state.bad_evals + 1
    return replace(state, bad_evals=bad, last_step=step, stopped=patience > 0 and bad >= patience), False


class EarlyStopping:
    """The stage-side wrapper of `decide`: reads the metric, writes ``best/``, keeps its state in ``extra``."""

    def __init__(self, metric: str, mode: str, patience: int, min_delta: float, extra: Dict[str, Any]):
        if patience < 0:
            raise ValueError(f"stage.early_stopping_patience={patience} must be >= 0 (0 = keep the best, never stop)")
        self.metric, self.mode, self.patience, self.min_delta = metric, resolve_mode(metric, mode), patience, min_delta
        self.extra = extra
        self.state = StopState(**extra.get(STATE_KEY, {}))

    @classmethod
    def from_config(cls, stage_cfg, extra: Dict[str, Any], *, has_loss: bool, has_generative: bool
                    ) -> Optional["EarlyStopping"]:
        """None when ``stage.early_stopping_metric`` is not set. ``extra`` is ``TrainState.extra`` (checkpointed).
        ``has_loss`` / ``has_generative``: whether the stage's evals log ``eval/loss`` / generative ``eval/*``
        metrics, so that an unreachable metric fails now rather than at the first eval."""
        metric = stage_cfg.early_stopping_metric
        if not metric:
            return None
        if stage_cfg.eval_steps <= 0:
            raise ValueError(f"stage.early_stopping_metric={metric!r} needs periodic evals: set stage.eval_steps > 0 "
                             f"(got {stage_cfg.eval_steps})")
        if metric == "eval/loss" and not has_loss:
            raise ValueError(f"stage.early_stopping_metric={metric!r}: this stage logs no eval loss (SFT logs it when "
                             "the data has a held-out split: data.eval_sources or data.eval_fraction)")
        if metric != "eval/loss" and not has_generative:
            raise ValueError(f"stage.early_stopping_metric={metric!r} is a generative eval metric, and this stage "
                             "runs no generative eval: it needs held-out prompts (data.eval_sources or "
                             "data.eval_fraction) and, in SFT, reward=<preset>")
        return cls(metric, stage_cfg.early_stopping_mode, int(stage_cfg.early_stopping_patience),
                   float(stage_cfg.early_stopping_min_delta), extra)

    @property
    def stopped(self) -> bool:
        return self.state.stopped

    def observe(self, metrics: Mapping[str, Any], step: int) -> bool:
        """Record one eval; True when it improved on the best."""
        if self.metric not in metrics:
            raise KeyError(f"stage.early_stopping_metric={self.metric!r} is not among this stage's eval metrics "
                           f"{sorted(k for k in metrics if k.startswith('eval/'))} (a generative metric such as "
                           "eval/accuracy needs reward=<preset> in SFT)")
        self.state, improved = decide(self.state, float(metrics[self.metric]), step, mode=self.mode,
                                      patience=self.patience, min_delta=self.min_delta)
        self.extra[STATE_KEY] = asdict(self.state)
        return improved

    def after_eval(self, metrics: Mapping[str, Any], step: int, acc, model, tokenizer, run_folder) -> bool:
        """Observe, save ``best/`` on an improvement (every rank calls this: ZeRO-3 gathers), return True to stop."""
        if self.observe(metrics, step):
            save_best(acc, model, tokenizer, run_folder, self.info())
        if acc.is_main_process:
            log.info("early stopping: %s=%.6g at step %d (best %.6g at step %s, %d/%d evals without improvement)%s",
                     self.metric, float(metrics[self.metric]), step, self.state.best if self.state.best is not None
                     else float("nan"), self.state.best_step, self.state.bad_evals, self.patience,
                     " -> stopping" if self.stopped else "")
        return self.stopped

    def info(self) -> Dict[str, Any]:
        return {"metric": self.metric, "mode": self.mode, "patience": self.patience, "min_delta": self.min_delta,
                "best": self.state.best, "best_step": self.state.best_step, "stopped_early": self.state.stopped}


def best_dir(run_folder) -> Path:
    return Path(run_folder.root) / "best"


def save_best(acc, model, tokenizer, run_folder, info: Dict[str, Any]) -> Path:
    """``best/``: HF weights (LoRA: the adapter, nothing is merged mid-training) + ``best.json``, written to
    ``best.tmp/`` and renamed, so a crash never leaves half a best model."""
    from stagewise.training.checkpoint import save_hf

    path = best_dir(run_folder)
    tmp = path.with_name("best.tmp")
    if acc.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    acc.wait_for_everyone()
    save_hf(acc, model, tokenizer, tmp, merge_lora=False)
    if acc.is_main_process:
        (tmp / "best.json").write_text(json.dumps(info, indent=2))
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    acc.wait_for_everyone()
    return path


def save_final_model(acc, model, tokenizer, run_folder, stopper: Optional[EarlyStopping], last_step: int) -> Path:
    """``final/``: the last model without early stopping; the best one with it (see the module docstring)."""
    from stagewise.training.checkpoint import save_final

    best = best_dir(run_folder)
    use_best = (stopper is not None and stopper.state.best_step is not None and stopper.state.best_step != last_step
                and (best / "best.json").exists())
    unwrapped = acc.unwrap_model(model)
    lora = hasattr(unwrapped, "peft_config")
    final = Path(run_folder.final)
    if use_best and lora:
        _load_adapter(unwrapped, best)
    if use_best and not lora:
        if acc.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            _link_tree(best, final)
            (final / "best.json").unlink(missing_ok=True)
        acc.wait_for_everyone()
    else:
        save_final(acc, model, tokenizer, run_folder)
    if stopper is not None and acc.is_main_process:
        info = {**stopper.info(), "last_step": last_step, "final_is": "best" if use_best or
                stopper.state.best_step == last_step else "last"}
        (final / "early_stopping.json").write_text(json.dumps(info, indent=2))
    acc.wait_for_everyone()
    return final


def _link_tree(src: Path, dst: Path) -> None:
    """Copy a folder by hard links (no extra disk), falling back to real copies across file systems."""
    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link)


def _load_adapter(peft_model, folder: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    files = sorted(folder.glob("adapter_model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no adapter_model.safetensors to restore the best LoRA adapter from")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    set_peft_model_state_dict(peft_model, state)
