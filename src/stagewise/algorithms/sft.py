"""SFT token loss with a normaliser fixed over the whole optimizer step.

``loss = -sum(logprobs * loss_mask) / normalizer``. The loop passes as ``normalizer`` the number of trained tokens
in *all* micro-batches of the optimizer step on *all* ranks (divided by the world size when DDP averages
gradients). Summing the micro-batch losses then gives exactly the full-batch token mean, whatever the split and the
padding. Averaging per-micro-batch means instead weights a token in a short micro-batch more than one in a long
micro-batch: the gradient-accumulation bug transformers and TRL fixed in late 2024.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from stagewise.algorithms.masking import as_bool_mask, as_divisor, masked_sum


def sft_loss(
    logprobs: torch.Tensor, loss_mask: torch.Tensor, normalizer: float | int | torch.Tensor | None = None
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """``logprobs [B, T]`` of the target tokens, ``loss_mask [B, T]`` (1 = trained) -> ``(loss, metrics)``.

    ``normalizer=None`` divides by this batch's own trained-token count (eval, or no accumulation). Metrics are
    detached: ``nll_sum`` and ``num_tokens`` (sum them over micro-batches for an exact step loss) and ``nll_mean``.
    """
    if tuple(logprobs.shape) != tuple(loss_mask.shape):
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and loss_mask {tuple(loss_mask.shape)} differ in shape")
    nll_sum = -masked_sum(logprobs, loss_mask)
    tokens = as_bool_mask(loss_mask).sum()
    divisor = tokens.clamp(min=1).to(nll_sum.dtype) if normalizer is None else as_divisor(normalizer, nll_sum)
    loss = nll_sum / divisor
    metrics = {
        "nll_sum": nll_sum.detach(),
        "num_tokens": tokens,
        "nll_mean": nll_sum.detach() / tokens.clamp(min=1).to(nll_sum.dtype),
    }
    return loss, metrics
