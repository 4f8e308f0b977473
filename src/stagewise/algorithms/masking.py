"""Masked reductions and registry lookup shared by the algorithm functions.

Masks are ``[B, T]`` float or bool tensors (1/True = the token is trained). Values at masked-out positions may be
anything, including ``nan`` or ``-inf`` (padding log-probs): every reduction here selects with ``torch.where``
instead of multiplying, so garbage under the mask never leaks into a sum or a gradient.
"""

from __future__ import annotations

from typing import Mapping, TypeVar

import torch

T = TypeVar("T")


def as_bool_mask(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` where ``mask`` is set, over ``dim`` (all dims when None)."""
    x = torch.where(as_bool_mask(mask), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the masked positions; 0 (not nan) where the mask is empty."""
    count = as_bool_mask(mask).sum() if dim is None else as_bool_mask(mask).sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)


def masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max of ``x`` over the masked positions (0 when the mask is empty). No host sync."""
    m = as_bool_mask(mask)
    best = torch.where(m, x, torch.full((), float("-inf"), dtype=x.dtype, device=x.device)).max()
    return torch.where(m.any(), best, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_min(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Min of ``x`` over the masked positions (0 when the mask is empty). No host sync."""
    return -masked_max(-x, mask)


def lookup(registry: Mapping[str, T], value: str, key: str) -> T:
    """``registry[value]``, or a ValueError naming the config key, e.g. ``algorithm.loss_agg='x' is not one of ...``."""
    try:
        return registry[value]
    except (KeyError, TypeError):
        raise ValueError(f"{key}={value!r} is not one of {', '.join(registry)}") from None


def as_divisor(normalizer: float | int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A loss normaliser as a tensor on ``like``'s device and dtype.

    A normaliser of 0 means "nothing is trained in this whole optimizer step": the numerator is then 0 too, and
    the loss is 0 (not nan). Negative python normalisers are a bug in the caller and raise.
    """
    if not isinstance(normalizer, torch.Tensor):
        if not normalizer >= 0:
            raise ValueError(f"loss normalizer must be >= 0, got {normalizer!r}")
        normalizer = torch.tensor(float(normalizer))
    return normalizer.to(device=like.device, dtype=like.dtype).clamp(min=torch.finfo(like.dtype).tiny)
