"""``sdpa_varlen``: PyTorch sdpa that runs a packed row one document at a time (the CPU/no-flash-attn default).

A packed row (GRPO's ``hardware.max_tokens_per_micro_batch``) holds several sequences end to end. flash-attention
runs it as variable-length batches (``cu_seq_lens``) and never computes attention across documents. Plain sdpa
cannot: transformers gives it a dense block-diagonal ``[nnz, nnz]`` mask, so a 2,048-token row of eight 256-token
sequences costs the attention of one 2,048-token sequence (8x that of the documents) and a mask that large; on CPU
that made the packed update slower than the padded one. This implementation takes the same ``cu_seq_lens_q``
keyword flash-attention takes and calls sdpa causally on each document's slice (sum of L_i^2, no mask at all).
Without ``cu_seq_lens_q`` (every ordinary forward and generation) it *is* transformers' sdpa, unchanged.

Shared prompts (verl's "prefix grouper"). GRPO's ``n`` samples of a prompt share it, and a packed row can carry
it once: ``[prompt, completion_1, ..., completion_n]`` with each completion's positions continuing from the prompt's
length. `SharedPrefixLayout` describes such a row; given as ``shared_prefix_layout``, each group's prompt attends
causally to itself and each completion to the whole prompt plus its own earlier tokens, never to a sibling
completion: every value and gradient equals running ``prompt + completion_i`` as ``n`` separate sequences, while the
prompt's layers run once instead of ``n`` times. Unlike sharing the prompt's KV cache (GRPO's padded path) this is a
single forward, so it works under gradient checkpointing. flash-attention is not used for this layout (a model
loaded with ``flash_attention_2`` packs without sharing; see `shares_prefix_in_packed_rows`).

The caller must pass ``cu_seq_lens_q`` or ``shared_prefix_layout`` only together with the "no mask" mapping from
`packed_forward_kwargs`; `stagewise.training.modeling.final_hidden` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

NAME = "sdpa_varlen"


@dataclass(frozen=True)
class PrefixGroup:
    """One prompt and the completions that follow it in a packed row."""

    start: int  # packed position of the prompt's first token
    prompt_len: int
    completion_lens: Tuple[int, ...]


@dataclass(frozen=True)
class SharedPrefixLayout:
    """A packed row of groups ``[prompt, completion_1, ..., completion_n]`` back to back."""

    groups: Tuple[PrefixGroup, ...]

    @classmethod
    def build(cls, groups: Sequence[Tuple[int, Sequence[int]]]) -> "SharedPrefixLayout":
        """``[(prompt_len, [completion_len, ...]), ...]`` in row order -> the layout (prompts non-empty)."""
        out, start = [], 0
        for prompt_len, lens in groups:
            if prompt_len < 1:
                raise ValueError("a shared-prefix group needs a non-empty prompt")
            lens = tuple(int(c) for c in lens)
            out.append(PrefixGroup(start=start, prompt_len=int(prompt_len), completion_lens=lens))
            start += prompt_len + sum(lens)
        return cls(groups=tuple(out))

    @property
    def num_tokens(self) -> int:
        return sum(g.prompt_len + sum(g.completion_lens) for g in self.groups)


def _shared_prefix_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: SharedPrefixLayout,
                             dropout: float, scaling: Optional[float]) -> torch.Tensor:
    """``query``/``key``/``value`` ``[1, H, nnz, D]`` (heads already repeated) -> ``[1, H, nnz, D]``: per group one
    causal sdpa over the prompt, then per completion one sdpa of its queries over the prompt's keys and its own,
    causal from the bottom right (query ``i`` sees the whole prompt and completion tokens ``0..i``). No padding:
    the attention costs ``p^2 / 2 + sum(c_i * (p + c_i))`` per group, against ``sum((p + c_i)^2) / 2`` unshared."""
    from torch.nn.attention.bias import causal_lower_right

    parts = []
    for g in layout.groups:
        s, p = g.start, g.prompt_len
        kp, vp = key[:, :, s:s + p], value[:, :, s:s + p]
        parts.append(F.scaled_dot_product_attention(query[:, :, s:s + p], kp, vp, is_causal=True, dropout_p=dropout,
                                                    scale=scaling))
        offset = s + p
        for c in g.completion_lens:
            if c == 0:
                continue
            end = offset + c
            parts.append(F.scaled_dot_product_attention(
                query[:, :, offset:end], torch.cat([kp, key[:, :, offset:end]], dim=2),
                torch.cat([vp, value[:, :, offset:end]], dim=2), attn_mask=causal_lower_right(c, p + c),
                dropout_p=dropout, scale=scaling))
            offset = end
    return torch.cat(parts, dim=2)


def sdpa_varlen_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                          scaling: Optional[float] = None, cu_seq_lens_q: Optional[torch.Tensor] = None,
                          shared_prefix_layout: Optional[SharedPrefixLayout] = None, **kwargs: Any):
    """transformers' attention-function signature: ``query [B, H, T, D]``, ``key``/``value`` ``[B, Hkv, T, D]``
    -> ``([B, T, H, D], None)``."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if cu_seq_lens_q is None and shared_prefix_layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1 or attention_mask is not None:
        raise ValueError("sdpa_varlen: a packed row (cu_seq_lens_q / shared_prefix_layout) needs one row and no "
                         "attention mask")
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    dropout = dropout if module.training else 0.0
    if shared_prefix_layout is not None:
        if shared_prefix_layout.num_tokens != query.shape[2]:
            raise ValueError(f"shared_prefix_layout covers {shared_prefix_layout.num_tokens} tokens, the row has "
                             f"{query.shape[2]}")
        out = _shared_prefix_attention(query, key, value, shared_prefix_layout, dropout, scaling)
        return out.transpose(1, 2).contiguous(), None
    bounds = cu_seq_lens_q.tolist()
    parts = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True,
                                            dropout_p=dropout, scale=scaling)
             for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``attn_implementation="sdpa_varlen"`` known to transformers (attention and mask functions)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, sdpa_varlen_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def shares_prefix_in_packed_rows(model) -> bool:
    """Whether ``model``'s attention runs `SharedPrefixLayout` rows (``sdpa_varlen``)."""
    inner = getattr(model, "module", model)
    return getattr(getattr(inner, "config", None), "_attn_implementation", None) == NAME


def packed_forward_kwargs(model, cu_seq_lens: torch.Tensor,
                          shared_prefix_layout: Optional[SharedPrefixLayout] = None) -> Dict[str, Any]:
    """Keyword arguments for a forward over one packed row whose sequences start at ``cu_seq_lens[:-1]`` (int32,
    on the CPU: read once per layer without a device sync; `stagewise.training.modeling.pack_rows` builds it from
    the lengths). With ``sdpa_varlen``: the boundaries and a "no mask" mapping (the model then builds no
    ``[nnz, nnz]`` mask). With any other implementation: ``attention_mask=None``, so transformers detects the
    packing from the restarting ``position_ids`` itself (block-diagonal mask for sdpa/eager, varlen for
    flash-attention). ``shared_prefix_layout`` (``sdpa_varlen`` only): the row shares prompts as described there."""
    no_mask = {"full_attention": None, "sliding_attention": None}
    if shared_prefix_layout is not None:
        if not shares_prefix_in_packed_rows(model):
            raise ValueError("a shared-prefix packed row needs model.attn_implementation=sdpa_varlen")
        return {"attention_mask": no_mask, "shared_prefix_layout": shared_prefix_layout}
    if not shares_prefix_in_packed_rows(model):
        return {"attention_mask": None}
    longest = int((cu_seq_lens[1:] - cu_seq_lens[:-1]).max())
    return {"attention_mask": no_mask, "cu_seq_lens_q": cu_seq_lens,
            "cu_seq_lens_k": cu_seq_lens, "max_length_q": longest, "max_length_k": longest}
