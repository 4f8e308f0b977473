"""Packing and collation for SFT.

`pack` is best-fit-decreasing: documents sorted longest first (ties by index), each put into the open bin with the
least room that still fits it, else a new bin. A packed row restarts ``position_ids`` at 0 for each document, and
attention never crosses documents:

- sdpa / eager (CPU and GPU): transformers 5 detects packed rows from ``position_ids`` when no ``attention_mask``
  is given (``masking_utils.find_packed_sequence_indices``) and builds the block-diagonal causal mask itself, so
  the collator sends no mask. That detection is skipped when the model holds a KV cache, so **call the model with
  ``use_cache=False``** (Qwen3's config defaults to ``use_cache=True``, which silently leaks attention across
  documents; tests/unit/test_data_packing.py checks both).
- flash_attention_2: transformers runs varlen flash-attention from ``position_ids`` only for a batch of one row
  (``modeling_flash_attention_utils._is_packed_sequence``); a multi-row packed batch would silently attend across
  documents. So use ``SFTCollator(flatten=True)`` (``SFTCollator.for_model`` picks it): the whole micro-batch
  becomes one row with no padding at all.
- sdpa_varlen (the default without flash-attention): flattened too, packed or not, and the batch carries
  ``cu_seq_lens`` (where each document starts), which `stagewise.models.attention` runs one document at a time:
  no pad token through any layer and no ``[T, T]`` block-diagonal mask (padded-mode SFT is padding-free).

Labels follow the HF convention (unshifted, -100 where no loss). The first token of every document is also -100,
so that no position is trained to predict across a document boundary: the unpacked and packed losses agree
exactly (the first token is never a target in an unpacked row either).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

IGNORE_INDEX = -100


def pack(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Best-fit-decreasing bins of document indices, each bin's total length <= ``max_length``.

    Bins are returned in creation order; documents inside a bin in insertion order (longest first).
    """
    lengths = [int(x) for x in lengths]
    too_long = [i for i, n in enumerate(lengths) if n > max_length]
    if too_long:
        raise ValueError(f"documents {too_long[:5]} are longer than max_length={max_length}; tokenise with "
                         "data.overlong=drop or truncate first")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (free slots, bin id) of bins that still have room
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(room, (n, -1))
        if k < len(room):
            free, b = room.pop(k)
        else:
            free, b = max_length, len(bins)
            bins.append([])
        bins[b].append(i)
        if free - n > 0:
            bisect.insort(room, (free - n, b))
    return bins


def packing_efficiency(lengths: Sequence[int], bins: list[list[int]], max_length: int) -> float:
    """Non-pad tokens / slots, where slots = number of bins x max_length."""
    return sum(int(lengths[i]) for b in bins for i in b) / (len(bins) * max_length) if bins else 0.0


def document_position_ids(doc_lengths: Sequence[int]) -> list[int]:
    return [p for n in doc_lengths for p in range(n)]


class PackedDataset(torch.utils.data.Dataset):
    """Map-style dataset of packed rows over a tokenised dataset (``input_ids``, ``loss_mask``, ``length``).

    Item i concatenates the documents of bin i: ``input_ids``, ``loss_mask``, ``position_ids`` (restarting per
    document). ``bins`` are computed once with `pack`, so the row layout is a pure function of the data.
    """

    def __init__(self, dataset, max_length: int, bins: list[list[int]] | None = None):
        self.dataset = dataset
        self.max_length = max_length
        self.lengths = np.asarray(dataset["length"], dtype=np.int64)
        self.bins = bins if bins is not None else pack(self.lengths, max_length)

    @property
    def efficiency(self) -> float:
        return packing_efficiency(self.lengths, self.bins, self.max_length)

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        rows = self.dataset[self.bins[i]]
        return {
            "input_ids": [t for ids in rows["input_ids"] for t in ids],
            "loss_mask": [t for m in rows["loss_mask"] for t in m],
            "position_ids": document_position_ids([len(ids) for ids in rows["input_ids"]]),
        }


class SFTCollator:
    """Items -> a batch of tensors ``input_ids``, ``position_ids``, ``loss_mask`` (1 = this token is a target),
    ``labels`` (``input_ids`` where trained, else -100; HF convention, unshifted) and, for unpacked padded rows,
    ``attention_mask``.

    Items are tokenised rows (``input_ids``, ``loss_mask``) or packed rows from `PackedDataset` (with
    ``position_ids``). Padded layout (default): right padding with ``pad_token_id`` to the longest row (rounded up
    to ``pad_to_multiple_of``). A padded tail of a packed row gets its own restarting positions, so it forms a
    separate block that no document attends to. ``flatten=True``: every item is concatenated into a single row
    without padding (for flash-attention varlen and ``sdpa_varlen``), with ``cu_seq_lens`` (int32: each document's
    start, then the row length). Call the model with ``use_cache=False`` for packed batches.
    """

    def __init__(self, pad_token_id: int, *, flatten: bool = False, pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise ValueError("SFTCollator needs a pad_token_id (the tokenizer's pad token)")
        self.pad_token_id = int(pad_token_id)
        self.flatten = flatten
        self.pad_to_multiple_of = pad_to_multiple_of

    @classmethod
    def for_model(cls, model, pad_token_id: int, **kwargs) -> "SFTCollator":
        """A collator that flattens batches when ``model`` runs flash-attention or ``sdpa_varlen`` (both attend one
        document at a time in a single row), else pads."""
        from stagewise.models.attention import NAME as SDPA_VARLEN

        attn = getattr(getattr(model, "config", None), "_attn_implementation", None) or "sdpa"
        return cls(pad_token_id, flatten=attn.startswith("flash") or attn == SDPA_VARLEN, **kwargs)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        packed = any("position_ids" in it for it in items)
        rows = []  # (ids, target mask with each document's first token unset, positions)
        for it in items:
            ids = list(it["input_ids"])
            pos = list(it["position_ids"]) if "position_ids" in it else list(range(len(ids)))
            mask = [int(bool(m) and p != 0) for m, p in zip(it["loss_mask"], pos)]
            rows.append((ids, mask, pos))
        if self.flatten:
            rows = [tuple([x for r in rows for x in r[k]] for k in range(3))]
            width = len(rows[0][0])
        else:
            width = max(len(r[0]) for r in rows)
            if self.pad_to_multiple_of:
                width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        cols: dict[str, list] = {"input_ids": [], "position_ids": [], "loss_mask": [], "labels": [],
                                 "attention_mask": []}
        for ids, mask, pos in rows:
            pad = width - len(ids)
            cols["input_ids"].append(ids + [self.pad_token_id] * pad)
            cols["loss_mask"].append(mask + [0] * pad)
            cols["labels"].append([t if m else IGNORE_INDEX for t, m in zip(ids, mask)] + [IGNORE_INDEX] * pad)
            cols["position_ids"].append(pos + (list(range(pad)) if packed else list(range(len(ids), width))))
            cols["attention_mask"].append([1] * len(ids) + [0] * pad)
        if packed or self.flatten:
            del cols["attention_mask"]
        batch = {k: torch.tensor(v, dtype=torch.long) for k, v in cols.items()}
        if self.flatten:
            from stagewise.models.attention import sequence_starts

            batch["cu_seq_lens"] = sequence_starts(rows[0][2])
        return batch
