"""Per-token log-probs and entropies without full-vocabulary logits for a whole batch.

``chunked_token_logprobs`` takes the model's last hidden states and the LM-head weight and walks over the tokens
``chunk_size`` at a time: each chunk's ``[chunk, V]`` logits are built, reduced to one log-prob (and entropy) per
token, and freed. Each chunk runs under ``torch.utils.checkpoint``, so backward recomputes the chunk's logits
instead of keeping them: peak memory is ``O(chunk_size * V)`` in forward *and* backward, where a plain
``model(...).logits`` holds ``B * T * V`` floats (151,936 x 16K tokens x 4 bytes = 10 GB for one Qwen sequence; the
usual long-context OOM of RL trainers). Pass ``mask`` to compute only the tokens you need (completions), which
also skips their work entirely.

Numerics: logits are computed in the weight's dtype (as the model's own ``lm_head`` would) and upcast to fp32
before ``logsumexp``; temperature divides the logits, matching how the sampler drew the tokens (TRL and verl do the
same). Works for plain linear heads (Llama/Qwen families); models with a bias or logit soft-capping should compute
logits themselves and call ``token_logprobs_from_logits``.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from stagewise.algorithms.masking import as_bool_mask, masked_max, masked_mean, masked_min


def _logprobs_from_logits_2d(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool, entropy_grad: bool = True
) -> Tuple[torch.Tensor, ...]:
    """``logits [N, V]``, ``targets [N]`` (negative = ignored, log-prob 0) -> ``(logprobs [N],)`` or
    ``(logprobs [N], entropy [N])`` in fp32. ``entropy_grad=False`` computes the entropy outside autograd, so its
    ``[N, V]`` softmax is not kept for a backward that would never use it (a metric, not a loss term)."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)
    valid = targets >= 0
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logprobs = torch.where(valid, picked - lse, torch.zeros((), dtype=lse.dtype, device=lse.device))
    if not with_entropy:
        return (logprobs,)
    with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_grad):
        entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logprobs, entropy


def lm_head_logits(h: torch.Tensor, head: torch.Tensor | torch.nn.Module) -> torch.Tensor:
    """``h [N, H]`` -> logits ``[N, V]`` through the LM-head weight ``[V, H]`` or the bias-free head module (ZeRO-3:
    calling the module lets its hooks gather the partitioned weight)."""
    return head(h) if isinstance(head, torch.nn.Module) else F.linear(h, head)


def _chunk(h: torch.Tensor, head, targets: torch.Tensor, temperature: float, with_entropy: bool,
           entropy_grad: bool = True):
    logits = lm_head_logits(h, head)
    return _logprobs_from_logits_2d(logits, targets, temperature, with_entropy, entropy_grad)


def chunked_token_logprobs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor | torch.nn.Module,
    targets: torch.Tensor,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    with_entropy: bool = False,
    mask: Optional[torch.Tensor] = None,
    entropy_grad: bool = True,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``log softmax(hidden @ W.T / temperature)[targets]`` per token, computed ``chunk_size`` tokens at a time.

    Shapes: ``hidden [B, T, H]``, ``lm_head_weight [V, H]``, ``targets [B, T]`` (the *next* token of each position,
    already shifted; negative ids give 0), optional ``mask [B, T]`` (only those tokens are computed; the rest are 0).
    Returns ``(logprobs [B, T], entropy [B, T] or None)`` in fp32, differentiable w.r.t. ``hidden`` and the weight
    (the entropy too unless ``entropy_grad=False``).

    ``lm_head_weight`` may also be the head *module* (a bias-free ``nn.Linear``): under DeepSpeed ZeRO-3 the weight is
    a partitioned placeholder outside the module's own call, and calling the module (also when backward recomputes
    a chunk) lets ZeRO-3's hooks gather it.
    """
    if chunk_size < 1:
        raise ValueError(f"hardware.logprob_chunk_size={chunk_size!r} must be >= 1")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature!r} must be > 0 for log-probs")
    b, t, h = hidden.shape
    if tuple(targets.shape) != (b, t):
        raise ValueError(f"targets must be [B, T] = {(b, t)}, got {tuple(targets.shape)}")
    if isinstance(lm_head_weight, torch.nn.Module):
        if getattr(lm_head_weight, "in_features", h) != h:
            raise ValueError(f"lm_head must take H={h} features, got {lm_head_weight.in_features}")
        needs_grad = any(p.requires_grad for p in lm_head_weight.parameters())
    elif lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != h:
        raise ValueError(f"lm_head_weight must be [V, H={h}], got {tuple(lm_head_weight.shape)}")
    else:
        needs_grad = lm_head_weight.requires_grad
    flat_h = hidden.reshape(b * t, h)
    flat_t = targets.reshape(b * t)
    index = None
    if mask is not None:
        index = as_bool_mask(mask).reshape(b * t).nonzero().squeeze(-1)
        flat_h, flat_t = flat_h.index_select(0, index), flat_t.index_select(0, index)

    use_ckpt = torch.is_grad_enabled() and (hidden.requires_grad or needs_grad)
    lp_parts, ent_parts = [], []
    for start in range(0, flat_h.shape[0], chunk_size):
        args = (flat_h[start:start + chunk_size], lm_head_weight, flat_t[start:start + chunk_size], temperature,
                with_entropy, entropy_grad)
        out = checkpoint(_chunk, *args, use_reentrant=False) if use_ckpt else _chunk(*args)
        lp_parts.append(out[0])
        if with_entropy:
            ent_parts.append(out[1])

    def assemble(parts):
        if parts:
            values = torch.cat(parts)
        else:
            values = flat_h.new_zeros(0, dtype=torch.float32)
        if index is None:
            return values.reshape(b, t)
        full = torch.zeros(b * t, dtype=values.dtype, device=values.device)
        return full.index_put((index,), values).reshape(b, t)

    return assemble(lp_parts), (assemble(ent_parts) if with_entropy else None)


def token_logprobs_from_logits(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, with_entropy: bool = False,
    entropy_grad: bool = True,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The same for logits already computed, ``logits [B, T, V]`` -> ``(logprobs [B, T], entropy [B, T] or None)``.
    Rows are upcast to fp32 one sequence at a time, so a bf16 batch never gets a full fp32 copy in forward."""
    if logits.dim() != 3 or tuple(targets.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"logits must be [B, T, V] and targets [B, T]; got {tuple(logits.shape)}, "
                         f"{tuple(targets.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature!r} must be > 0 for log-probs")
    rows = [_logprobs_from_logits_2d(logits[i], targets[i], temperature, with_entropy, entropy_grad)
            for i in range(logits.shape[0])]
    logprobs = torch.stack([r[0] for r in rows])
    entropy = torch.stack([r[1] for r in rows]) if with_entropy else None
    return logprobs, entropy


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of ``softmax(logits / temperature)`` over the last dim, in fp32: ``[..., V] -> [...]``."""
    logits = logits.float() / temperature
    return torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)


def entropy_metrics(entropy: torch.Tensor, mask: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Token-entropy summary over trained tokens (``[B, T]`` each): ``entropy/mean`` (token mean, TRL's ``entropy``),
    ``entropy/min`` and ``entropy/max`` over tokens, and ``entropy/seq_mean_min`` — the lowest per-sequence mean,
    the first number to fall when a policy collapses (entropy collapse). Detached 0-dim tensors."""
    with torch.no_grad():
        e = entropy.detach().float()
        m = as_bool_mask(mask)
        seq_mean = masked_mean(e, m, dim=-1)
        return {
            "entropy/mean": masked_mean(e, m),
            "entropy/min": masked_min(e, m),
            "entropy/max": masked_max(e, m),
            "entropy/seq_mean_min": masked_min(seq_mean, m.any(-1)),
        }
