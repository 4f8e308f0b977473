"""Group-relative advantages (GRPO, DeepSeekMath eq. 3 outcome supervision) with switchable scaling.

``A_i = (r_i - mean(group)) / scale``, where ``scale`` is ``algorithm.adv_scale``:

* ``group`` — the group's std (original GRPO);
* ``batch`` — the std of every reward in the batch, after centring per group (TRL ``scale_rewards="batch"``;
  "REINFORCE++-baseline"-style, robust for groups with a tiny but nonzero spread);
* ``none``  — no scaling (Dr. GRPO: the std term biases updates towards too-easy and too-hard prompts).

Where we depart from peers: a group whose rewards are all equal gets advantage *exactly* 0 under every scale.
Floating-point centring can leave ~1e-8 residues (``mean([0.1] * 3) != 0.1``) that a ``std + eps`` divisor
blows up to ~1e-2; we detect the group with ``max == min`` and write 0. Std is the unbiased sample std
(``torch.std``), as in TRL and verl.
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch

from stagewise.algorithms.masking import lookup


def _std(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    n = x.numel() if dim is None else x.shape[dim]
    correction = 1 if n > 1 else 0  # a single sample has spread 0, not nan
    if dim is None:
        return x.std(correction=correction)
    return x.std(dim=dim, correction=correction, keepdim=keepdim)


def scale_by_group_std(centered: torch.Tensor, grouped: torch.Tensor, eps: float) -> torch.Tensor:
    """``centered [P, G] / (std of each group + eps)``."""
    return centered / (_std(grouped, dim=1, keepdim=True) + eps)


def scale_by_batch_std(centered: torch.Tensor, grouped: torch.Tensor, eps: float) -> torch.Tensor:
    """``centered [P, G] / (std of all rewards + eps)``."""
    return centered / (_std(grouped) + eps)


def no_scale(centered: torch.Tensor, grouped: torch.Tensor, eps: float) -> torch.Tensor:
    return centered


ADVANTAGE_SCALES: Dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "group": scale_by_group_std,
    "batch": scale_by_batch_std,
    "none": no_scale,
}


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-6
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Advantages for ``rewards [N]`` laid out as ``N / group_size`` contiguous groups (prompt-major:
    rows ``[k * G, (k + 1) * G)`` are the samples of prompt ``k``).

    Returns ``(advantages [N], metrics)``; metrics are detached 0-dim tensors:
    ``reward_mean``, ``reward_std`` (mean of the per-group stds: the learning signal GRPO sees),
    ``reward_std_batch``, ``frac_reward_zero_std`` (fraction of groups with identical rewards), ``advantage_abs_mean``.
    """
    scale_fn = lookup(ADVANTAGE_SCALES, scale, "algorithm.adv_scale")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    n = rewards.numel()
    if group_size < 1 or n % group_size != 0:
        raise ValueError(f"{n} rewards cannot be split into groups of rollout.n={group_size}")
    r = rewards if rewards.is_floating_point() else rewards.float()
    bad = ~torch.isfinite(r)
    if bool(bad.any()):
        raise ValueError(f"rewards are not finite at rows {bad.nonzero().flatten().tolist()}: {r[bad].tolist()}")

    grouped = r.view(n // group_size, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    zero_std = grouped.amax(dim=1) == grouped.amin(dim=1)  # [P]; exact, unlike std() < eps
    adv = torch.where(zero_std[:, None], torch.zeros_like(centered), scale_fn(centered, grouped, eps)).reshape(n)

    metrics = {
        "reward_mean": r.mean().detach(),
        "reward_std": _std(grouped, dim=1).mean().detach(),
        "reward_std_batch": _std(r).detach(),
        "frac_reward_zero_std": zero_std.float().mean(),
        "advantage_abs_mean": adv.abs().mean().detach(),
    }
    return adv, metrics
