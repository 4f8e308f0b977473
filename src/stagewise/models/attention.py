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
    """One prompt and the completions that follow it in a packed row, with the index tensors every layer reuses."""

    start: int  # packed position of the prompt's first token
    prompt_len: int
    completion_lens: Tuple[int, ...]
    gather: torch.Tensor  # [n * width]: packed position of each completion token, padded rows point at ``start``
    keep: torch.Tensor  # [sum(completion_lens)]: which of the ``n * width`` gathered slots are real, in row order
    mask: torch.Tensor  # [n, 1, width, prompt_len + width] bool: the whole prompt, then causal within the completion

    @property
    def width(self) -> int:
        return max(self.completion_lens, default=0)


@dataclass(frozen=True)
class SharedPrefixLayout:
    """A packed row of groups ``[prompt, completion_1, ..., completion_n]`` back to back (`PrefixGroup` each)."""

    groups: Tuple[PrefixGroup, ...]

    @classmethod
    def build(cls, groups: Sequence[Tuple[int, Sequence[int]]], device) -> "SharedPrefixLayout":
        """``[(prompt_len, [completion_len, ...]), ...]`` in row order -> the layout (prompts non-empty)."""
        out, start = [], 0
        for prompt_len, lens in groups:
            if prompt_len < 1:
                raise ValueError("a shared-prefix group needs a non-empty prompt")
            lens = tuple(int(c) for c in lens)
            width = max(lens, default=0)
            gather, keep, offset = [], [], start + prompt_len
            for i, c in enumerate(lens):
                gather.extend(list(range(offset, offset + c)) + [start] * (width - c))
                keep.extend(range(i * width, i * width + c))
                offset += c
            q = torch.arange(width)
            causal = q[None, :] <= q[:, None]  # [width, width]
            mask = torch.cat([torch.ones(width, prompt_len, dtype=torch.bool), causal], dim=1)
            mask = mask[None, None].expand(len(lens), 1, width, prompt_len + width).contiguous()
            as_index = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
            out.append(PrefixGroup(start=start, prompt_len=prompt_len, completion_lens=lens, gather=as_index(gather),
                                   keep=as_index(keep), mask=mask.to(device)))
            start = offset
        return cls(groups=tuple(out))

    @property
    def num_tokens(self) -> int:
        return sum(g.prompt_len + sum(g.completion_lens) for g in self.groups)


def _shared_prefix_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: SharedPrefixLayout,
                             dropout: float, scaling: Optional[float]) -> torch.Tensor:
    """``query``/``key``/``value`` ``[1, H, nnz, D]`` (heads already repeated) -> ``[H, nnz, D]``: per group one causal
    sdpa over the prompt and one masked sdpa of the ``n`` completions (padded to the longest) over prompt + own
    tokens."""
    q, k, v = query[0], key[0], value[0]
    heads, _, dim = q.shape
    parts = []
    for g in layout.groups:
        s, p, n, w = g.start, g.prompt_len, len(g.completion_lens), g.width
        kp, vp = k[:, s:s + p], v[:, s:s + p]
        parts.append(F.scaled_dot_product_attention(q[None, :, s:s + p], kp[None], vp[None], is_causal=True,
                                                    dropout_p=dropout, scale=scaling)[0])
        if w == 0:
            continue

        def completions(t: torch.Tensor) -> torch.Tensor:  # [H, nnz, D] -> [n, H, w, D]
            return t.index_select(1, g.gather).view(heads, n, w, dim).transpose(0, 1)

        def with_prompt(t_prompt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # -> [n, H, p + w, D]
            return torch.cat([t_prompt[None].expand(n, heads, p, dim), completions(t)], dim=2)

        out = F.scaled_dot_product_attention(completions(q), with_prompt(kp, k), with_prompt(vp, v),
                                             attn_mask=g.mask, dropout_p=dropout, scale=scaling)
        parts.append(out.transpose(0, 1).reshape(heads, n * w, dim).index_select(1, g.keep))
    return torch.cat(parts, dim=1)


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
        return out.transpose(0, 1).unsqueeze(0).contiguous(), None
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
