"""``sdpa_varlen`` (``model.attn_implementation=auto``): transformers' sdpa, except that a packed row runs one
document at a time, through flash-attention's varlen kernel where it runs (flash-attn installed, CUDA, half
precision) and one PyTorch sdpa per document elsewhere.

A packed row (SFT, GRPO's ``hardware.max_tokens_per_micro_batch``) holds several sequences end to end. Plain sdpa
cannot run it without attending across documents: transformers gives it a dense block-diagonal ``[nnz, nnz]``
mask, so a 2,048-token row of eight 256-token sequences costs the attention of one 2,048-token sequence (8x that of
the documents) and a mask that large; on CPU that made the packed update slower than the padded one. This
implementation takes the same ``cu_seq_lens_q`` keyword flash-attention takes and attends within each document
(sum of L_i^2, no mask at all). Without ``cu_seq_lens_q`` (every ordinary forward and generation) it *is*
transformers' sdpa, unchanged.

Shared prompts (verl's "prefix grouper"). GRPO's ``n`` samples of a prompt share it, and a packed row can carry
it once: ``[prompt, completion_1, ..., completion_n]`` with each completion's positions continuing from the prompt's
length. `SharedPrefixLayout` describes such a row; given as ``shared_prefix_layout``, each group's prompt attends
causally to itself and each completion to the whole prompt plus its own earlier tokens, never to a sibling
completion: every value and gradient equals running ``prompt + completion_i`` as ``n`` separate sequences, while the
prompt's layers run once instead of ``n`` times. It is one variable-length attention over gathered keys (each
completion's keys are the prompt's, repeated, then its own: `shared_prefix_plan`), causal from the bottom right,
the rule flash-attention applies when a sequence has more keys than queries; only the prompt's keys and values are
copied, never its layers re-run. Unlike sharing the prompt's KV cache (GRPO's padded path) this is a single
forward, so it works under gradient checkpointing. transformers' own ``flash_attention_2`` has no such layout (a
model loaded with it by name packs without sharing; see `shares_prefix_in_packed_rows`).

The caller must pass ``cu_seq_lens_q`` or ``shared_prefix_layout`` only together with the "no mask" mapping from
`packed_forward_kwargs`; `stagewise.training.modeling.final_hidden` does.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
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


@lru_cache(maxsize=32)
def shared_prefix_plan(layout: SharedPrefixLayout, device: str = "cpu"
                       ) -> Tuple[Tuple[int, ...], Tuple[int, ...], torch.Tensor]:
    """The layout as variable-length attention over gathered keys: ``(cu_q, cu_k, key_index)``. Query sequences
    are the row's segments in order (each prompt, then each of its non-empty completions); the keys of a prompt are
    its own tokens, those of a completion the prompt's then its own (``key_index``: packed positions, the prompt's
    repeated for each completion). With the causal mask aligned to the bottom right (flash-attention's rule when a
    sequence has more keys than queries) each completion token sees the whole prompt and its own earlier tokens."""
    cu_q, cu_k, index = [0], [0], []
    for g in layout.groups:
        prompt = list(range(g.start, g.start + g.prompt_len))
        segments = [(g.start, g.prompt_len, prompt)]
        offset = g.start + g.prompt_len
        for c in g.completion_lens:
            if c:
                segments.append((offset, c, prompt + list(range(offset, offset + c))))
            offset += c
        for _, q_len, keys in segments:
            cu_q.append(cu_q[-1] + q_len)
            cu_k.append(cu_k[-1] + len(keys))
            index += keys
    return tuple(cu_q), tuple(cu_k), torch.tensor(index, dtype=torch.long, device=device)  # once per layout


def sequence_starts(position_ids: Sequence[int]) -> torch.Tensor:
    """``cu_seq_lens`` of one packed row: where its positions restart at 0, then the row length (int32, on the CPU).
    The one rule both flattened-row builders use (SFT's `stagewise.data.SFTCollator` and GRPO's
    `stagewise.training.modeling.pack_rows`): a sequence is a run of positions counting up from 0."""
    starts = [i for i, p in enumerate(position_ids) if p == 0] + [len(position_ids)]
    return torch.tensor(starts, dtype=torch.int32)


def varlen_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_q: Sequence[int],
                     cu_k: Sequence[int], dropout: float, scaling: Optional[float]) -> torch.Tensor:
    """``query [1, H, Tq, D]``, ``key``/``value`` ``[1, Hkv, Tk, D]`` -> ``[1, Tq, H, D]``: queries
    ``cu_q[i]:cu_q[i+1]`` attend keys ``cu_k[i]:cu_k[i+1]``, causal from the bottom right. flash-attention's varlen
    kernel where it runs (installed, CUDA, half precision), else one sdpa per sequence (no mask when a sequence has
    as many keys as queries, ``causal_lower_right`` otherwise)."""
    if _flash_runs(query):
        from flash_attn import flash_attn_varlen_func

        device = str(query.device)
        out = flash_attn_varlen_func(
            query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
            _on_device(tuple(cu_q), torch.int32, device), _on_device(tuple(cu_k), torch.int32, device),
            max(b - a for a, b in zip(cu_q[:-1], cu_q[1:])), max(b - a for a, b in zip(cu_k[:-1], cu_k[1:])),
            dropout_p=dropout, softmax_scale=scaling, causal=True)
        return out.unsqueeze(0)
    from torch.nn.attention.bias import causal_lower_right
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    parts = []
    for qs, qe, ks, ke in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:]):
        if qe == qs:
            continue
        mask = None if qe - qs == ke - ks else causal_lower_right(qe - qs, ke - ks)
        parts.append(F.scaled_dot_product_attention(query[:, :, qs:qe], key[:, :, ks:ke], value[:, :, ks:ke],
                                                    attn_mask=mask, is_causal=mask is None, dropout_p=dropout,
                                                    scale=scaling))
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous()


@lru_cache(maxsize=64)
def _on_device(values: Tuple[int, ...], dtype: torch.dtype, device: str) -> torch.Tensor:
    """``values`` as a tensor on ``device``, made once per row layout (every layer of a forward reuses it)."""
    return torch.tensor(values, dtype=dtype, device=device)


def _flash_runs(query: torch.Tensor) -> bool:
    return query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and _flash_installed()


@lru_cache(maxsize=1)
def _flash_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def sdpa_varlen_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                          scaling: Optional[float] = None, cu_seq_lens_q: Optional[torch.Tensor] = None,
                          shared_prefix_layout: Optional[SharedPrefixLayout] = None, **kwargs: Any):
    """transformers' attention-function signature: ``query [B, H, T, D]``, ``key``/``value`` ``[B, Hkv, T, D]``
    -> ``([B, T, H, D], None)``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None and shared_prefix_layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1 or attention_mask is not None:
        raise ValueError("sdpa_varlen: a packed row (cu_seq_lens_q / shared_prefix_layout) needs one row and no "
                         "attention mask")
    dropout = dropout if module.training else 0.0
    if shared_prefix_layout is None:
        bounds = tuple(cu_seq_lens_q.tolist())
        return varlen_attention(query, key, value, bounds, bounds, dropout, scaling), None
    if shared_prefix_layout.num_tokens != query.shape[2]:
        raise ValueError(f"shared_prefix_layout covers {shared_prefix_layout.num_tokens} tokens, the row has "
                         f"{query.shape[2]}")
    cu_q, cu_k, index = shared_prefix_plan(shared_prefix_layout, str(key.device))
    return varlen_attention(query, key[:, :, index], value[:, :, index], cu_q, cu_k, dropout, scaling), None


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
