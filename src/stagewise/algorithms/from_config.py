"""Bridge from ``AlgorithmConfig`` to the pure functions: validation at startup and the ``policy_loss`` settings."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

from stagewise.algorithms.advantages import ADVANTAGE_SCALES
from stagewise.algorithms.kl import KL_ESTIMATORS
from stagewise.algorithms.masking import lookup
from stagewise.algorithms.policy_loss import LOSS_AGGREGATIONS, RATIO_LEVELS, check_clip

ALGORITHMS = ("sft", "grpo", "dr_grpo", "dapo", "gspo")


def check_algorithm_config(cfg: Any) -> None:
    """Fail before any model is loaded, naming the bad ``algorithm.*`` key. ``sft`` reads no GRPO field."""
    if cfg.name not in ALGORITHMS:
        raise ValueError(f"algorithm.name={cfg.name!r} is not one of {', '.join(ALGORITHMS)}")
    if cfg.name == "sft":
        return
    lookup(ADVANTAGE_SCALES, cfg.adv_scale, "algorithm.adv_scale")
    lookup(RATIO_LEVELS, cfg.ratio_level, "algorithm.ratio_level")
    lookup(LOSS_AGGREGATIONS, cfg.loss_agg, "algorithm.loss_agg")
    lookup(KL_ESTIMATORS, cfg.kl_estimator, "algorithm.kl_estimator")
    check_clip(cfg.clip_eps_low, cfg.clip_eps_high, cfg.dual_clip_c)
    if cfg.loss_agg_max_tokens is not None and cfg.loss_agg_max_tokens <= 0:
        raise ValueError(f"algorithm.loss_agg_max_tokens={cfg.loss_agg_max_tokens!r} must be > 0 (or null)")
    if cfg.beta < 0:
        raise ValueError(f"algorithm.beta={cfg.beta!r} must be >= 0")
    if cfg.max_resample_rounds < 0:
        raise ValueError(f"algorithm.max_resample_rounds={cfg.max_resample_rounds!r} must be >= 0")
    if cfg.max_resample_rounds > 0 and not cfg.filter_zero_std_groups:
        raise ValueError("algorithm.max_resample_rounds > 0 refills filtered groups, so it needs "
                         "algorithm.filter_zero_std_groups=true")
    if cfg.tis_cap is not None and not cfg.tis_cap > 0:
        raise ValueError(f"algorithm.tis_cap={cfg.tis_cap!r} must be > 0 (or null to turn TIS off)")


@dataclasses.dataclass(frozen=True)
class PolicyLossSettings:
    """The ``policy_loss`` keyword arguments one GRPO stage trains with, read once from ``algorithm.*``."""

    ratio_level: str
    clip_eps_low: float
    clip_eps_high: float
    dual_clip_c: Optional[float]
    loss_agg: str
    max_tokens: int  # the Dr. GRPO constant: ``algorithm.loss_agg_max_tokens``, else ``rollout.max_new_tokens``
    beta: float
    kl_estimator: str
    entropy_coef: float

    @classmethod
    def from_config(cls, cfg: Any, max_new_tokens: int) -> "PolicyLossSettings":
        """``cfg``: the ``algorithm`` config; ``max_new_tokens``: ``rollout.max_new_tokens``."""
        return cls(ratio_level=cfg.ratio_level, clip_eps_low=cfg.clip_eps_low, clip_eps_high=cfg.clip_eps_high,
                   dual_clip_c=cfg.dual_clip_c, loss_agg=cfg.loss_agg,
                   max_tokens=cfg.loss_agg_max_tokens or max_new_tokens, beta=cfg.beta,
                   kl_estimator=cfg.kl_estimator, entropy_coef=cfg.entropy_coef)

    def as_kwargs(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)
