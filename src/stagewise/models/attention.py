"""``sdpa_varlen``: PyTorch sdpa that runs a packed row one document at a time (the CPU/no-flash-attn default).

A packed row (GRPO's ``hardware.max_tokens_per_micro_batch``) holds several sequences end to end. flash-attention
runs it as variable-length batches (``cu_seq_lens``) and never computes attention across documents. Plain sdpa
cannot: transformers gives it a dense block-diagonal ``[nnz, nnz]`` mask, so a 2,048-token row of eight 256-token
sequences costs the attention of one 2,048-token sequence (8x that of the documents) and a mask that large; on CPU
that made the packed update slower than the padded one. This implementation takes the same ``cu_seq_lens_q``
keyword flash-attention takes and calls sdpa causally on each document's slice (sum of L_i^2, no mask at all).
Without ``cu_seq_lens_q`` (every ordinary forward and generation) it *is* transformers' sdpa, unchanged.

The caller must pass ``cu_seq_lens_q`` only together with the "no mask" mapping from `packed_forward_kwargs`;
`stagewise.training.modeling.final_hidden` does.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F

NAME = "sdpa_varlen"


def sdpa_varlen_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                          scaling: Optional[float] = None, cu_seq_lens_q: Optional[torch.Tensor] = None,
                          **kwargs: Any):
    """transformers' attention-function signature: ``query [B, H, T, D]``, ``key``/``value`` ``[B, Hkv, T, D]``
    -> ``([B, T, H, D], None)``."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1 or attention_mask is not None:
        raise ValueError("sdpa_varlen: cu_seq_lens_q needs one packed row and no attention mask")
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    bounds = cu_seq_lens_q.tolist()
    parts = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True,
                                            dropout_p=dropout if module.training else 0.0, scale=scaling)
             for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``attn_implementation="sdpa_varlen"`` known to transformers (attention and mask functions)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, sdpa_varlen_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def packed_forward_kwargs(model, cu_seq_lens: torch.Tensor) -> Dict[str, Any]:
    """Keyword arguments for a forward over one packed row whose sequences start at ``cu_seq_lens[:-1]`` (int32,
    on the CPU: read once per layer without a device sync; `stagewise.training.modeling.pack_rows` builds it from
    the lengths). With ``sdpa_varlen``: the boundaries and a "no mask" mapping (the model then builds no
    ``[nnz, nnz]`` mask). With any other implementation: ``attention_mask=None``, so transformers detects the
    packing from the restarting ``position_ids`` itself (block-diagonal mask for sdpa/eager, varlen for
    flash-attention)."""
    inner = getattr(model, "module", model)
    config = getattr(inner, "config", None)
    if getattr(config, "_attn_implementation", None) != NAME:
        return {"attention_mask": None}
    longest = int((cu_seq_lens[1:] - cu_seq_lens[:-1]).max())
    return {"attention_mask": {"full_attention": None, "sliding_attention": None}, "cu_seq_lens_q": cu_seq_lens,
            "cu_seq_lens_k": cu_seq_lens, "max_length_q": longest, "max_length_k": longest}
