"""The clipped policy-gradient loss of GRPO and its variants, its aggregation modes, and truncated IS weights.

Per token ``t`` of sequence ``i`` (advantage ``A_i``, ratio ``r`` = pi / pi_old)::

    pg = max(-A * r, -A * clip(r, 1 - eps_low, 1 + eps_high))       PPO clip; eps_high > eps_low = DAPO clip-higher
    pg = min(pg, -A * c)            if A < 0 and dual_clip_c = c      dual clip (Ye et al. 2020): caps the loss of a
                                                                      negative advantage at c * |A| when r explodes
    loss_t = w_t * pg + beta * KL_t - entropy_coef * H_t              w_t = truncated IS weight (vLLM mismatch)

``ratio_level="sequence"`` is GSPO: every token of sequence ``i`` uses ``s_i = exp(mean_t log r_{i,t})``. We write it
as GSPO-token (GSPO paper eq. 13-14), ``s_{i,t} = sg[s_i] * pi(y_t) / sg[pi(y_t)]``: its value is ``s_i`` and its
gradient is ``s_i * grad log pi(y_t)``, so with ``seq_mean_token_mean`` the gradient is exactly GSPO's eq. 10 and
per-token advantages (multi-turn) still work.

Aggregation (``algorithm.loss_agg``) reduces ``loss_t [B, T]`` to a scalar as ``numerator / normalizer``:

* ``token_mean``               ``sum_{i,t} loss / #tokens``                       (DAPO; TRL "dapo", verl default)
* ``seq_mean_token_mean``      ``sum_i (sum_t loss / |y_i|) / #sequences``        (original GRPO)
* ``seq_mean_token_sum_norm``  ``sum_i (sum_t loss / max_tokens) / #sequences``   (Dr. GRPO: a constant length)

The numerator is a plain sum over sequences, so a batch split into micro-batches gives the full-batch loss and
gradients exactly when every micro-batch divides by the *global* normaliser (``normalizer=``, the sum of
``loss_normalizer(mask)`` over all micro-batches and ranks of the optimizer step). Departure from TRL's "grpo":
``#sequences`` counts sequences with at least one trained token, so completions masked out entirely (truncated,
with ``mask_truncated``) do not dilute the mean (verl does the same).

The log-ratio is clamped to [-20, 20] before ``exp`` (as verl does); with any sane clip range this never changes a
gradient that is not already zero.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch

from stagewise.algorithms.kl import LOG_RATIO_CLAMP, kl_estimate
from stagewise.algorithms.masking import (
    as_bool_mask,
    as_divisor,
    lookup,
    masked_max,
    masked_mean,
    masked_min,
    masked_sum,
)

Metrics = Dict[str, torch.Tensor]


# ------------------------------------------------------------------------------------------------ aggregation
def agg_token_mean(x: torch.Tensor, mask: torch.Tensor, max_tokens: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(sum of all trained token values, number of trained tokens)``."""
    return masked_sum(x, mask), as_bool_mask(mask).sum()


def agg_seq_mean_token_mean(
    x: torch.Tensor, mask: torch.Tensor, max_tokens: Optional[int]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(sum over sequences of each sequence's token mean, number of non-empty sequences)``."""
    n = as_bool_mask(mask).sum(-1)
    return (masked_sum(x, mask, dim=-1) / n.clamp(min=1).to(x.dtype)).sum(), (n > 0).sum()


def agg_seq_mean_token_sum_norm(
    x: torch.Tensor, mask: torch.Tensor, max_tokens: Optional[int]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(sum over sequences of token sum / max_tokens, number of non-empty sequences)``."""
    if max_tokens is None or max_tokens <= 0:
        raise ValueError(
            f"algorithm.loss_agg=seq_mean_token_sum_norm needs a positive constant length: set "
            f"algorithm.loss_agg_max_tokens (default rollout.max_new_tokens), got {max_tokens!r}"
        )
    return masked_sum(x, mask) / max_tokens, (as_bool_mask(mask).sum(-1) > 0).sum()


LOSS_AGGREGATIONS: Dict[
    str, Callable[[torch.Tensor, torch.Tensor, Optional[int]], Tuple[torch.Tensor, torch.Tensor]]
] = {
    "token_mean": agg_token_mean,
    "seq_mean_token_mean": agg_seq_mean_token_mean,
    "seq_mean_token_sum_norm": agg_seq_mean_token_sum_norm,
}


def loss_normalizer(mask: torch.Tensor, loss_agg: str) -> torch.Tensor:
    """This micro-batch's share of the normaliser: trained tokens (``token_mean``) or non-empty sequences (the seq
    modes). Sum it over the micro-batches and ranks of an optimizer step and pass the total as ``normalizer=``."""
    m = as_bool_mask(mask)
    lookup(LOSS_AGGREGATIONS, loss_agg, "algorithm.loss_agg")
    return m.sum() if loss_agg == "token_mean" else (m.sum(-1) > 0).sum()


def aggregate(
    x: torch.Tensor,
    mask: torch.Tensor,
    loss_agg: str,
    max_tokens: Optional[int] = None,
    normalizer: float | int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce per-token values ``x [B, T]`` to a scalar with ``loss_agg``; ``normalizer=None`` uses this batch's own
    (a full-batch mean), a given one makes the result a summable micro-batch share."""
    numerator, local = lookup(LOSS_AGGREGATIONS, loss_agg, "algorithm.loss_agg")(x, mask, max_tokens)
    divisor = local.clamp(min=1).to(numerator.dtype) if normalizer is None else as_divisor(normalizer, numerator)
    return numerator / divisor


# ------------------------------------------------------------------------------------------------ policy loss
RATIO_LEVELS = {"token": "token", "sequence": "sequence"}


def _check_shapes(logprobs: torch.Tensor, mask: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    if logprobs.dim() != 2 or tuple(mask.shape) != tuple(logprobs.shape):
        raise ValueError(f"logprobs and mask must both be [B, T]; got {tuple(logprobs.shape)} and {tuple(mask.shape)}")
    for name, t in others.items():
        if t is not None and tuple(t.shape) != tuple(logprobs.shape):
            raise ValueError(f"{name} must have the shape of logprobs {tuple(logprobs.shape)}, got {tuple(t.shape)}")


def check_clip(clip_eps_low: float, clip_eps_high: float, dual_clip_c: Optional[float]) -> None:
    if not 0.0 <= clip_eps_low < 1.0:
        raise ValueError(f"algorithm.clip_eps_low={clip_eps_low!r} must be in [0, 1)")
    if clip_eps_high < 0.0:
        raise ValueError(f"algorithm.clip_eps_high={clip_eps_high!r} must be >= 0")
    if dual_clip_c is not None and dual_clip_c <= 1.0:
        raise ValueError(f"algorithm.dual_clip_c={dual_clip_c!r} must be > 1 (it caps -A * ratio at c * |A| for A < 0)")


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ratio_level: str = "token",
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    dual_clip_c: Optional[float] = None,
    loss_agg: str = "seq_mean_token_mean",
    max_tokens: Optional[int] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    is_weights: Optional[torch.Tensor] = None,
    entropy: Optional[torch.Tensor] = None,
    entropy_coef: float = 0.0,
    normalizer: float | int | torch.Tensor | None = None,
) -> Tuple[torch.Tensor, Metrics]:
    """Clipped surrogate loss (to minimise) and its metrics.

    Shapes: ``logprobs``, ``old_logprobs``, ``mask``, and the optional ``ref_logprobs``, ``is_weights``, ``entropy``
    are ``[B, T]`` (completion tokens; ``mask`` float or bool, 1 = trained). ``advantages`` is ``[B]`` (one per
    sequence) or ``[B, T]`` (per token). Only ``logprobs`` (and ``entropy``, if given) carry gradients; the other
    inputs are detached here. Values under the mask may be anything, including nan/-inf.

    ``ref_logprobs`` with ``beta > 0`` adds ``beta * KL`` (``kl_estimator`` k1/k2/k3) aggregated like the loss; with
    ``beta == 0`` the KL is only measured. ``is_weights`` (``truncated_is_weights``) multiply the policy term only,
    as in TRL and verl. ``entropy`` with ``entropy_coef`` subtracts an entropy bonus. ``normalizer``: see module doc.

    Metrics (detached 0-dim tensors, means over *this call's* trained tokens): ``pg_loss``, ``clip_ratio/low_mean``
    (r < 1 - eps_low with A < 0), ``clip_ratio/high_mean`` (r > 1 + eps_high with A > 0), ``clip_ratio/region_mean``
    (either; TRL's names), ``clip_ratio/dual_mean`` (dual clip active), ``ratio/mean``, ``ratio/max``,
    ``ratio/min``, and ``kl`` / ``entropy`` when those inputs are given.
    """
    level = lookup(RATIO_LEVELS, ratio_level, "algorithm.ratio_level")
    check_clip(clip_eps_low, clip_eps_high, dual_clip_c)
    _check_shapes(logprobs, mask, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, is_weights=is_weights,
                  entropy=entropy)
    if beta != 0.0 and ref_logprobs is None:
        raise ValueError(f"algorithm.beta={beta} adds a KL term, which needs ref_logprobs (got None)")
    m = as_bool_mask(mask)
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    # Clean garbage under the mask first: nan * 0-gradient is still nan in backward.
    lp = torch.where(m, logprobs, zero)
    old = torch.where(m, old_logprobs.detach(), zero)
    adv = advantages.detach().to(lp.dtype)
    if adv.dim() == 1:
        if adv.shape[0] != lp.shape[0]:
            raise ValueError(f"advantages [B] has B={adv.shape[0]} but logprobs has B={lp.shape[0]}")
        adv = adv[:, None]
    elif tuple(adv.shape) != tuple(lp.shape):
        raise ValueError(f"advantages must be [B] or [B, T] = {tuple(lp.shape)}, got {tuple(advantages.shape)}")
    adv = adv.expand_as(lp)

    if level == "token":
        log_ratio = lp - old
    else:  # GSPO: value = mean token log-ratio of the sequence, gradient = d log pi(y_t)
        seq_log_ratio = masked_mean(lp - old, m, dim=-1).detach()
        log_ratio = torch.where(m, seq_log_ratio[:, None] + lp - lp.detach(), zero)
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))

    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high))
    if dual_clip_c is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * dual_clip_c), pg)
    if is_weights is not None:
        pg = pg * torch.where(m, is_weights.detach().to(pg.dtype), zero)
    per_token = pg

    kl = None
    if ref_logprobs is not None:
        ref = torch.where(m, ref_logprobs.detach(), zero)
        kl = kl_estimate(lp, ref, kl_estimator)
        if beta != 0.0:
            per_token = per_token + beta * kl
    if entropy is not None and entropy_coef != 0.0:
        per_token = per_token - entropy_coef * torch.where(m, entropy, zero)

    loss = aggregate(per_token, m, loss_agg, max_tokens, normalizer)

    with torch.no_grad():
        r = ratio.detach()
        low = (r < 1.0 - clip_eps_low) & (adv < 0)
        high = (r > 1.0 + clip_eps_high) & (adv > 0)
        metrics: Metrics = {
            "pg_loss": aggregate(pg.detach(), m, loss_agg, max_tokens),
            "clip_ratio/low_mean": masked_mean(low.to(r.dtype), m),
            "clip_ratio/high_mean": masked_mean(high.to(r.dtype), m),
            "clip_ratio/region_mean": masked_mean((low | high).to(r.dtype), m),
            "ratio/mean": masked_mean(r, m),
            "ratio/max": masked_max(r, m),
            "ratio/min": masked_min(r, m),
        }
        if dual_clip_c is not None:
            metrics["clip_ratio/dual_mean"] = masked_mean(((adv < 0) & (r > dual_clip_c)).to(r.dtype), m)
        if kl is not None:
            metrics["kl"] = masked_mean(kl.detach(), m)
        if entropy is not None:
            metrics["entropy"] = masked_mean(entropy.detach(), m)
    return loss, metrics


# ------------------------------------------------------------------------------- truncated importance sampling
def truncated_is_weights(
    train_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor, cap: float
) -> Tuple[torch.Tensor, Metrics]:
    """Truncated importance sampling (TIS, Yao et al. 2025 "Your efficient RL framework secretly brings you
    off-policy RL training"): per-token ``min(exp(train_logprob - rollout_logprob), cap)``, detached, 0 under the
    mask. ``train_logprobs`` are the trainer's log-probs of the sampled tokens under the policy that generated them
    (the old log-probs); ``rollout_logprobs`` are what the inference engine (vLLM) reported for the same tokens.

    Shapes: all ``[B, T]``. Metrics (over trained tokens): ``tis/weight_mean`` (after the cap),
    ``tis/ratio_mean`` and ``tis/ratio_max`` (before it), ``tis/frac_capped``, ``tis/logp_diff_abs_mean`` and
    ``tis/logp_diff_abs_max`` (``|train - rollout|``, the mismatch itself).
    """
    if not cap > 0:
        raise ValueError(f"algorithm.tis_cap={cap!r} must be > 0 (set it to null to turn TIS off)")
    _check_shapes(train_logprobs, mask, rollout_logprobs=rollout_logprobs)
    m = as_bool_mask(mask)
    with torch.no_grad():
        zero = torch.zeros((), dtype=train_logprobs.dtype, device=train_logprobs.device)
        diff = torch.where(m, train_logprobs.detach() - rollout_logprobs.detach(), zero)
        ratio = torch.exp(diff.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        weights = torch.where(m, ratio.clamp(max=cap), zero)
        metrics: Metrics = {
            "tis/weight_mean": masked_mean(weights, m),
            "tis/ratio_mean": masked_mean(ratio, m),
            "tis/ratio_max": masked_max(ratio, m),
            "tis/frac_capped": masked_mean((ratio > cap).to(ratio.dtype), m),
            "tis/logp_diff_abs_mean": masked_mean(diff.abs(), m),
            "tis/logp_diff_abs_max": masked_max(diff.abs(), m),
        }
    return weights, metrics
