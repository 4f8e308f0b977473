"""Trend alerts on the logged metrics, and the NaN guard.

``TrendAlerts.check(metrics, step)`` looks at one logged record (the dict the loop is about to pass to
``Tracker.log``) together with the records before it, and returns ``{"alert/<name>": 1.0, ...}`` for every alert
that fires on this record; the loop merges that into the record, so alerts land in metrics.jsonl, W&B and
TensorBoard like any metric, and each one is also printed (a WARNING through logging, so it reaches the console
and train.log). An alert that keeps holding fires again on every log: a collapsed entropy stays visible.

Alerts (names as logged):
  * ``alert/nonfinite_loss``            a loss key (``loss``, ``policy_loss``) is NaN or inf
  * ``alert/reward_falling/<fn>``       ``reward/<fn>/mean`` went down on each of the last N logs
                                        (``reward_falling_logs`` decreases in a row; ``<fn>`` includes ``total``)
  * ``alert/entropy_collapse``          entropy below ``entropy_collapse_fraction`` of its first logged value
  * ``alert/kl_blowup``                 KL above ``kl_max``, or above ``kl_spike_factor`` x the median of the
                                        previous ``window`` logs, or non-finite
  * ``alert/grad_norm_spike``           grad norm above ``grad_spike_factor`` x the median of the previous
                                        ``window`` logs, or non-finite

Where we depart from the R1-Zero tutorial (github.com/FareedKhan-dev/train-deepseek-r1): its "trend detection"
compares the last two values of a reward and prints "improvement"/"degradation" at every log, which fires on
noise. We alert only on runs of consecutive decreases and on robust (median-based) spikes, and we log the alerts as
metrics so that a notebook can find them later.

``NanGuard`` decides per optimizer step, from the step's loss (already reduced over ranks, so every rank decides
the same): ``"update"`` when it is finite, ``"skip"`` when it is not (the loop zeroes the gradients and does not
step), and ``"stop"`` after ``max_consecutive`` non-finite losses in a row (the loop saves a checkpoint of the
last good weights, then raises ``NonFiniteLossError``). Under DeepSpeed with bf16/fp16 the ZeRO optimizer already
skips a step whose gradients overflow (``check_grad_overflow``, on by default in DeepSpeed 0.19); the guard then
only counts and applies the stop rule. Both classes have ``state_dict()`` / ``load_state_dict()`` (plain JSON) so
that a resumed run alerts and stops exactly as the uninterrupted one would.
"""

from __future__ import annotations

import logging
import math
import re
import statistics
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Deque, Dict, Iterable, Mapping, Optional, Sequence

import numpy as np

log = logging.getLogger("stagewise.alerts")

# Metric names the alerts (and stagewise.runs) recognise. The first key present in a record is used.
LOSS_KEYS = ("loss", "policy_loss")
ENTROPY_KEYS = ("entropy", "entropy/mean")
KL_KEYS = ("kl", "kl/mean")
GRAD_NORM_KEYS = ("grad_norm",)
REWARD_MEAN_RE = re.compile(r"^reward/(?P<fn>[^/]+)/mean$")

UPDATE, SKIP, STOP = "update", "skip", "stop"


# ------------------------------------------------------------------------------------------- pure functions
def as_float(value: Any) -> Optional[float]:
    """A metric value as a float; the strings metrics.jsonl uses for non-finite values ("nan", "inf") included.
    Returns None for anything that is not a number (strings such as a stage name, None, bools)."""
    if isinstance(value, bool) or value is None:
        return None
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in ("nan", "inf", "+inf", "-inf", "infinity", "-infinity"):
        return float(value)
    return None


def is_nonfinite(value: Any) -> bool:
    x = as_float(value)
    return x is not None and not math.isfinite(x)


def falling_streak(values: Sequence[float]) -> int:
    """How many times in a row the series went strictly down, counted back from its last value.

    >>> falling_streak([1, 3, 2, 1])
    2
    """
    n = 0
    for i in range(len(values) - 1, 0, -1):
        if values[i] < values[i - 1]:
            n += 1
        else:
            break
    return n


def is_spike(history: Sequence[float], value: float, factor: float, min_history: int) -> bool:
    """``value > factor * median(history)``, judged only with at least ``min_history`` earlier values and a
    positive median (a median of 0, e.g. KL while the policy still equals the reference, has no scale)."""
    if len(history) < min_history:
        return False
    med = statistics.median(history)
    return med > 0 and value > factor * med


def entropy_collapsed(first: float, value: float, fraction: float) -> bool:
    return first > 0 and value < fraction * first


def first_present(metrics: Mapping[str, Any], keys: Iterable[str]) -> Optional[str]:
    return next((k for k in keys if k in metrics and as_float(metrics[k]) is not None), None)


# ------------------------------------------------------------------------------------------------- alerts
@dataclass(frozen=True)
class AlertThresholds:
    reward_falling_logs: int = 5  # consecutive decreases of a reward/<fn>/mean
    entropy_collapse_fraction: float = 0.1  # of the first logged entropy
    kl_max: float = 1.0  # nats per token; far above any healthy GRPO run (0.001-0.1)
    kl_spike_factor: float = 10.0
    grad_spike_factor: float = 10.0
    window: int = 20  # logs kept for the spike medians
    min_history: int = 5  # earlier logs needed before a spike can be judged

    def __post_init__(self):
        if self.reward_falling_logs < 1 or self.window < 1 or self.min_history < 1:
            raise ValueError(f"alert thresholds must be >= 1: {self}")


class TrendAlerts:
    """Stateful over the run, pure otherwise: feed it every logged record in order."""

    def __init__(self, thresholds: AlertThresholds | None = None, **overrides: Any):
        if thresholds is not None and overrides:
            raise TypeError("pass either an AlertThresholds or keyword overrides, not both")
        self.t = thresholds or AlertThresholds(**overrides)
        self.rewards: Dict[str, Deque[float]] = {}
        self.kl: Deque[float] = deque(maxlen=self.t.window)
        self.grad_norm: Deque[float] = deque(maxlen=self.t.window)
        self.first_entropy: Optional[float] = None

    @classmethod
    def from_config(cls, alerts) -> "TrendAlerts":
        """Thresholds from ``logger.alerts`` (a stagewise.config.AlertsConfig, where their defaults live)."""
        import dataclasses

        return cls(AlertThresholds(**dataclasses.asdict(alerts)))

    def check(self, metrics: Mapping[str, Any], step: int) -> Dict[str, float]:
        fired: Dict[str, str] = {}

        key = next((k for k in LOSS_KEYS if is_nonfinite(metrics.get(k))), None)
        if key is not None:
            fired["nonfinite_loss"] = f"{key} is {as_float(metrics[key])}"

        for k, v in metrics.items():
            m = REWARD_MEAN_RE.match(k)
            x = as_float(v)
            if m is None or x is None or not math.isfinite(x):
                continue
            hist = self.rewards.setdefault(m["fn"], deque(maxlen=self.t.reward_falling_logs + 1))
            hist.append(x)
            streak = falling_streak(list(hist))
            if streak >= self.t.reward_falling_logs:
                fired[f"reward_falling/{m['fn']}"] = (
                    f"{k} fell on each of the last {streak} logs: "
                    + " -> ".join(f"{y:.4g}" for y in hist))

        key = first_present(metrics, ENTROPY_KEYS)
        if key is not None and math.isfinite(x := as_float(metrics[key])):
            if self.first_entropy is None:
                self.first_entropy = x
            elif entropy_collapsed(self.first_entropy, x, self.t.entropy_collapse_fraction):
                fired["entropy_collapse"] = (f"{key}={x:.4g} is below {self.t.entropy_collapse_fraction:g} x its first "
                                             f"value {self.first_entropy:.4g}")

        key = first_present(metrics, KL_KEYS)
        if key is not None:
            x = as_float(metrics[key])
            if not math.isfinite(x):
                fired["kl_blowup"] = f"{key} is {x}"
            else:
                if x > self.t.kl_max:
                    fired["kl_blowup"] = f"{key}={x:.4g} > kl_max={self.t.kl_max:g}"
                elif is_spike(list(self.kl), x, self.t.kl_spike_factor, self.t.min_history):
                    fired["kl_blowup"] = (f"{key}={x:.4g} > {self.t.kl_spike_factor:g} x median "
                                          f"{statistics.median(self.kl):.4g} of the last {len(self.kl)} logs")
                self.kl.append(x)

        key = first_present(metrics, GRAD_NORM_KEYS)
        if key is not None:
            x = as_float(metrics[key])
            if not math.isfinite(x):
                fired["grad_norm_spike"] = f"{key} is {x}"
            else:
                if is_spike(list(self.grad_norm), x, self.t.grad_spike_factor, self.t.min_history):
                    fired["grad_norm_spike"] = (f"{key}={x:.4g} > {self.t.grad_spike_factor:g} x median "
                                                f"{statistics.median(self.grad_norm):.4g} of the last "
                                                f"{len(self.grad_norm)} logs")
                self.grad_norm.append(x)

        for name, message in fired.items():
            log.warning("ALERT %s at step %d: %s", name, step, message)
        return {f"alert/{name}": 1.0 for name in fired}

    def state_dict(self) -> dict:
        return {"rewards": {k: list(v) for k, v in self.rewards.items()}, "kl": list(self.kl),
                "grad_norm": list(self.grad_norm), "first_entropy": self.first_entropy,
                "thresholds": asdict(self.t)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rewards = {k: deque(v, maxlen=self.t.reward_falling_logs + 1) for k, v in state["rewards"].items()}
        self.kl = deque(state["kl"], maxlen=self.t.window)
        self.grad_norm = deque(state["grad_norm"], maxlen=self.t.window)
        self.first_entropy = state["first_entropy"]


# ---------------------------------------------------------------------------------------------- NaN guard
class NonFiniteLossError(RuntimeError):
    """Raised by the loop after NanGuard said "stop"; the checkpoint saved just before holds the last good weights."""


def nan_guard_decision(loss: Any, consecutive: int, max_consecutive: int) -> tuple[str, int]:
    """Pure rule: ``(action, consecutive non-finite losses so far)`` for this step's loss."""
    x = as_float(loss)
    if x is not None and math.isfinite(x):
        return UPDATE, 0
    consecutive += 1
    return (STOP if consecutive >= max_consecutive else SKIP), consecutive


class NanGuard:
    def __init__(self, max_consecutive: int = 5):
        if max_consecutive < 1:
            raise ValueError(f"NanGuard max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.skipped_total = 0

    def observe(self, loss: Any) -> str:
        """``"update"``, ``"skip"`` or ``"stop"`` for this optimizer step (call it on every rank with the same,
        reduced loss)."""
        action, self.consecutive = nan_guard_decision(loss, self.consecutive, self.max_consecutive)
        if action != UPDATE:
            self.skipped_total += 1
            log.warning("non-finite loss (%s): update skipped (%d in a row, stop at %d)", loss, self.consecutive,
                        self.max_consecutive)
        return action

    def error(self, step: int, run_dir: str | None = None) -> NonFiniteLossError:
        where = f"; the checkpoint of step {step} in {run_dir}/checkpoints holds the last good weights" if run_dir \
            else ""
        return NonFiniteLossError(f"{self.consecutive} non-finite losses in a row (NanGuard max_consecutive="
                                  f"{self.max_consecutive}) at step {step}{where}. Lower stage.learning_rate or check "
                                  f"the data of the last steps, then rerun with the same run_id to resume.")

    def metrics(self) -> Dict[str, float]:
        return {"nan_guard/skipped_total": float(self.skipped_total)}

    def state_dict(self) -> dict:
        return {"consecutive": self.consecutive, "skipped_total": self.skipped_total}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.consecutive = int(state["consecutive"])
        self.skipped_total = int(state["skipped_total"])


class NoSignalWatch:
    """GRPO: warn once when the run's first `STEPS` steps had identical rewards in every group: their advantages are all
    zero, so nothing is learned (gradients 0, loss 0), usually because the model never produces what the reward
    scores (an untrained model: start from an SFT checkpoint) or because the reward never fires."""

    STEPS = 3

    def __init__(self) -> None:
        self.steps = 0  # leading steps without a signal; -1 once a step had one (or the warning was given)

    def add(self, frac_zero_std: float, totals: Optional[np.ndarray]) -> Optional[str]:
        if self.steps < 0:
            return None
        if frac_zero_std < 1.0:
            self.steps = -1
            return None
        self.steps += 1
        if self.steps < self.STEPS:
            return None
        self.steps = -1
        seen = np.unique(np.asarray(totals if totals is not None else [], dtype=float))[:3]
        message = (f"no learning signal: in each of the first {self.STEPS} steps every group's rewards were identical "
                   f"(total reward {', '.join(f'{v:g}' for v in seen) or 'none'}), so every advantage is 0 and nothing "
                   f"is learned; usually the model never produces what the reward scores (start from an SFT "
                   f"checkpoint: model.name_or_path=<run>/final) or the reward never fires")
        log.warning(message)
        return message


_warned: set = set()


def warn_nothing_trained(groups_kept: int, generation_rounds: int, max_new_tokens: int) -> None:
    """Say once why a GRPO step trained nothing, with the setting to change."""
    if groups_kept == 0:
        why = ("every group had identical rewards and algorithm.filter_zero_std_groups=true dropped them all "
               f"(after {generation_rounds} generation round(s); raise "
               "algorithm.max_resample_rounds, or make the reward less all-or-nothing)")
    else:
        why = (f"no completion token was trained: every kept completion was truncated at rollout.max_new_tokens="
               f"{max_new_tokens} and algorithm.mask_truncated=true (raise rollout.max_new_tokens)")
    if why not in _warned:
        _warned.add(why)
        log.warning("a step took no optimizer step: %s", why)
