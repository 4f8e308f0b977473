"""Per-token estimators of KL(pi || pi_ref) from sampled tokens (Schulman, "Approximating KL divergence", 2020).

With ``log_r = ref_logprob - logprob`` for a token sampled from pi:

* ``k1 = -log_r``                     unbiased, high variance, can be negative;
* ``k2 = 0.5 * log_r ** 2``           biased, low variance, >= 0 (its gradient is the true KL gradient);
* ``k3 = exp(log_r) - log_r - 1``     unbiased, low variance, >= 0 (DeepSeekMath eq. 4; TRL's only choice).

Departure: ``log_r`` is clamped to [-20, 20] before ``exp`` (as verl does) so one token whose reference
probability is ~0 cannot turn the loss into ``inf``; within that range the values are exact.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch

from stagewise.algorithms.masking import lookup

LOG_RATIO_CLAMP = 20.0


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logprobs - ref_logprobs).square()


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    log_r = (ref_logprobs - logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(log_r) - log_r - 1.0


KL_ESTIMATORS: Dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL estimate ``[B, T]`` (same shape as the inputs); gradients flow through ``logprobs``."""
    return lookup(KL_ESTIMATORS, estimator, "algorithm.kl_estimator")(logprobs, ref_logprobs)
