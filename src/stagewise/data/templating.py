"""Chat templating and loss masks for SFT: ``messages`` -> ``input_ids`` + ``loss_mask``, batched and cached.

Rules (DeepAnalyze's ms-swift SFT setup, github.com/ruc-datalab/DeepAnalyze):
- Text goes through the tokenizer's own chat template. Only assistant tokens carry loss; every assistant turn is
  trained, including the end-of-turn token (``<|im_end|>``), but not the newline the template writes after it.
- With ``data.mask_execute``, tokens from ``<Execute>`` through ``</Execute>`` (both tags) carry no loss, whether
  the execution output is inline in the assistant text or a ``role: execute`` message (those are folded into the
  assistant turn first, `merge_execute_messages`, which is how DeepAnalyze's template renders them). The masking
  works on token ids, so both tags must be single tokens (``stage=vocab`` adds them).
- Samples longer than ``data.max_length`` are dropped (ms-swift ``truncation_strategy=delete``, the default) or
  truncated (``data.overlong=truncate``); samples left with no trained token are dropped. All are counted.

Assistant masks come from ``apply_chat_template(..., return_assistant_tokens_mask=True)`` when the template has
``{% generation %}`` markers. Templates without them (the stock Qwen, DeepSeek and Llama ones) use
`assistant_char_spans`: each assistant content is located by rendering the conversation again with that content
replaced by a sentinel and diffing the two strings, so templates that rewrite history (Qwen3 drops earlier turns'
``<think>``) still get exact spans.

The tokenised dataset is saved under ``cache_dir/sft-<fingerprint>``, where the fingerprint hashes the data's
content, the tokenizer (vocabulary, added tokens, template) and the options, so a rerun loads it instantly and
any change re-tokenises.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, Features, List, Value, load_from_disk

from stagewise.config import DataConfig
from stagewise.data.schema import EXECUTE_CLOSE, EXECUTE_OPEN, Message, merge_execute_messages

log = logging.getLogger(__name__)

TOKENIZE_VERSION = 1  # bump when the output of tokenisation changes for the same inputs
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_SENTINEL = "\x00"
OK, OVERLONG, NO_TARGET = 0, 1, 2


class VocabError(ValueError):
    """The tokenizer lacks single-token DeepAnalyze tags needed for Execute masking."""


@dataclass
class TokenizeStats:
    rows_in: int = 0
    rows_out: int = 0
    overlong_dropped: int = 0
    truncated: int = 0
    no_target_dropped: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    seconds: float = 0.0
    cache_hit: bool = False
    fingerprint: str = ""

    @property
    def rows_per_s(self) -> float:
        return self.rows_in / self.seconds if self.seconds > 0 else float("inf")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rows_per_s": self.rows_per_s}


# ---------------------------------------------------------------------------------------------- templates
def chat_template_of(tokenizer) -> str:
    tpl = tokenizer.chat_template
    if isinstance(tpl, dict):
        tpl = tpl.get("default") or next(iter(tpl.values()))
    if not tpl:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no chat template; set model.chat_template "
                         "to a jinja string or a .jinja file")
    return tpl


def has_generation_markers(tokenizer) -> bool:
    return bool(_GENERATION_TAG.search(chat_template_of(tokenizer)))


def execute_tag_ids(tokenizer) -> tuple[int, int] | None:
    """Ids of ``<Execute>`` and ``</Execute>`` if each is a single token, else None."""
    ids = []
    for tag in (EXECUTE_OPEN, EXECUTE_CLOSE):
        enc = tokenizer.encode(tag, add_special_tokens=False)
        if len(enc) != 1:
            return None
        ids.append(enc[0])
    return ids[0], ids[1]


def execute_span_mask(input_ids: np.ndarray, open_id: int, close_id: int) -> np.ndarray:
    """True from each ``<Execute>`` token through its ``</Execute>`` token, inclusive (to the end if unclosed).

    A stray closing tag masks only itself. Loops over tag positions only, not tokens.
    """
    ids = np.asarray(input_ids)
    inside = np.zeros(len(ids), dtype=bool)
    start = None
    for pos in np.flatnonzero((ids == open_id) | (ids == close_id)):
        if ids[pos] == open_id:
            if start is None:
                start = pos
        elif start is not None:
            inside[start:pos + 1] = True
            start = None
        else:
            inside[pos] = True
    if start is not None:
        inside[start:] = True
    return inside


def _render(tokenizer, messages: list[Message], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_char_spans(tokenizer, messages: list[Message], text: str | None = None) -> list[tuple[int, int]]:
    """Character spans of ``text`` (the rendered conversation) that an assistant wrote, for templates without
    ``{% generation %}`` markers.

    For assistant message i, the conversation is rendered again with its content replaced by a sentinel; the
    common prefix and suffix of the two renderings bound the content. The span starts earlier, at the end of the
    generation prompt, when rendering ``messages[:i]`` with ``add_generation_prompt`` is a prefix of ``text``
    (so text the template itself opens the turn with, such as Qwen3's ``<think>\\n``, is trained: the model must
    produce it). It ends after the eos token when only whitespace separates the content from it.
    """
    text = _render(tokenizer, messages) if text is None else text
    eos = tokenizer.eos_token or ""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        probe = _render(tokenizer, messages[:i] + [{"role": "assistant", "content": _SENTINEL}] + messages[i + 1:])
        limit = min(len(text), len(probe))
        start = _common_prefix(text, probe, limit)
        end = len(text) - _common_prefix(text[::-1], probe[::-1], limit - start)
        if i > 0 and messages[i - 1]["role"] != "assistant":
            prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
            if len(prompt) <= start and text.startswith(prompt):
                start = len(prompt)
        if eos:
            nxt = text.find(eos, end)
            if nxt >= 0 and not text[end:nxt].strip():
                end = nxt + len(eos)
        if end > start:
            spans.append((start, end))
    return spans


def _common_prefix(a: str, b: str, limit: int) -> int:
    """Length of the common prefix of ``a`` and ``b`` (at most ``limit``), by bisection on C-level slice compares."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def spans_to_token_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
    """1 for each token whose first character lies inside a span."""
    starts = np.asarray([o[0] for o in offsets], dtype=np.int64)
    mask = np.zeros(len(starts), dtype=np.int8)
    for s, e in spans:
        mask[(starts >= s) & (starts < e)] = 1
    return mask


def encode_conversations(tokenizer, conversations: list[list[Message]]) -> list[tuple[list[int], np.ndarray]]:
    """Token ids and assistant masks (before Execute masking) for a batch of conversations."""
    if not conversations:
        return []
    if has_generation_markers(tokenizer):
        out = tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        return [(ids, np.asarray(m, dtype=np.int8)) for ids, m in zip(out["input_ids"], out["assistant_masks"])]
    texts = [_render(tokenizer, conv) for conv in conversations]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return [
        (ids, spans_to_token_mask(offsets, assistant_char_spans(tokenizer, conv, text)))
        for ids, offsets, conv, text in zip(enc["input_ids"], enc["offset_mapping"], conversations, texts)
    ]


# ----------------------------------------------------------------------------------------- the map function
def _tokenize_batch(batch: dict[str, list], *, tokenizer, max_length: int, overlong: str,
                    mask_execute: bool) -> dict[str, list]:
    conversations = [merge_execute_messages(conv) for conv in batch["messages"]]
    tags = execute_tag_ids(tokenizer) if mask_execute else None
    if mask_execute and tags is None and any(EXECUTE_OPEN in m["content"] for c in conversations for m in c):
        raise VocabError(
            f"the data has {EXECUTE_OPEN} spans to mask but the tokenizer ({tokenizer.name_or_path}) splits "
            f"{EXECUTE_OPEN}/{EXECUTE_CLOSE} into several tokens; run stage=vocab first to add the DeepAnalyze tags "
            "as single tokens (or set data.mask_execute=false)"
        )
    out: dict[str, list] = {"input_ids": [], "loss_mask": [], "length": [], "status": [], "truncated": [],
                            "trained": []}
    for ids, mask in encode_conversations(tokenizer, conversations):
        if tags is not None:
            mask = mask * ~execute_span_mask(np.asarray(ids), *tags)
        status, cut = OK, False
        if len(ids) > max_length:
            if overlong == "truncate":
                ids, mask, cut = ids[:max_length], mask[:max_length], True
            else:
                status = OVERLONG
        if status == OK and not mask.any():
            status = NO_TARGET
        out["input_ids"].append(list(ids))
        out["loss_mask"].append(mask.astype(np.int8).tolist())
        out["length"].append(len(ids))
        out["status"].append(status)
        out["truncated"].append(cut)
        out["trained"].append(int(mask.sum()))
    return out


# --------------------------------------------------------------------------------------------- fingerprint
def _hash_arrow(h, table) -> None:
    for name in table.column_names:
        h.update(name.encode())
        for chunk in table.column(name).chunks:
            h.update(f"{chunk.offset}:{len(chunk)}".encode())
            for buf in chunk.buffers():
                if buf is not None:
                    h.update(buf)


def data_fingerprint(ds: Dataset, columns: tuple[str, ...] = ("messages", "source")) -> str:
    """A hash of the content of ``columns`` (and of the row selection/order), read straight from Arrow buffers."""
    h = hashlib.blake2b(digest_size=16)
    _hash_arrow(h, ds.data.table.select([c for c in columns if c in ds.column_names]))
    h.update(str(len(ds)).encode())
    if ds._indices is not None:
        _hash_arrow(h, ds._indices.table)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.blake2b(digest_size=16)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    h.update(vocab.encode())
    h.update(chat_template_of(tokenizer).encode())
    h.update(json.dumps([str(tokenizer.eos_token), str(tokenizer.pad_token), len(tokenizer)]).encode())
    return h.hexdigest()


def default_cache_dir() -> str:
    return os.environ.get("STAGEWISE_CACHE_DIR", str(Path.home() / ".cache" / "stagewise" / "tokenized"))


# --------------------------------------------------------------------------------------------- public entry
def tokenize_sft(ds: Dataset, tokenizer, data_cfg: DataConfig, cache_dir: str | None = None,
                 use_cache: bool = True) -> tuple[Dataset, TokenizeStats]:
    """Chat dataset -> ``input_ids`` (int32), ``loss_mask`` (int8), ``length``, ``source``; plus counts.

    ``cache_dir`` defaults to ``data.cache_dir``, then ``$STAGEWISE_CACHE_DIR``, then ``~/.cache/stagewise/
    tokenized``. In a multi-process run call it on the main process first (``accelerator.main_process_first()``)
    so the others load the cache.
    """
    if data_cfg.overlong not in ("drop", "truncate"):
        raise ValueError(f"data.overlong must be drop or truncate, got {data_cfg.overlong!r}")
    t0 = time.perf_counter()
    options = dict(max_length=data_cfg.max_length, overlong=data_cfg.overlong, mask_execute=data_cfg.mask_execute,
                   version=TOKENIZE_VERSION)
    fp = hashlib.blake2b(json.dumps([data_fingerprint(ds), tokenizer_fingerprint(tokenizer), options],
                                    sort_keys=True).encode(), digest_size=12).hexdigest()
    root = Path(cache_dir or data_cfg.cache_dir or default_cache_dir()).expanduser()
    final = root / f"sft-{fp}"
    if use_cache and (final / "stats.json").exists():
        out = load_from_disk(str(final))
        stats = TokenizeStats(**json.loads((final / "stats.json").read_text()))
        stats.cache_hit, stats.seconds = True, time.perf_counter() - t0
        log.info("tokenised data loaded from cache %s (%d rows)", final, len(out))
        return out, stats

    features = Features({"input_ids": List(Value("int32")), "loss_mask": List(Value("int8")),
                         "length": Value("int32"), "status": Value("int8"), "truncated": Value("bool"),
                         "trained": Value("int32")})
    keep_cols = [c for c in ("source",) if c in ds.column_names]
    for c in keep_cols:
        features[c] = ds.features[c]
    tmp = root / f".tmp-sft-{fp}-{os.getpid()}"
    if use_cache:
        tmp.mkdir(parents=True, exist_ok=True)
    try:
        num_proc = data_cfg.num_proc if data_cfg.num_proc > 1 and len(ds) >= 2 * data_cfg.num_proc else None
        mapped = ds.map(
            _tokenize_batch, batched=True, batch_size=256, features=features,
            remove_columns=[c for c in ds.column_names if c not in keep_cols],
            fn_kwargs=dict(tokenizer=tokenizer, **{k: v for k, v in options.items() if k != "version"}),
            num_proc=num_proc, new_fingerprint=fp, desc="tokenising",
            **(dict(cache_file_name=str(tmp / "map.arrow")) if use_cache else dict(keep_in_memory=True)),
        )
        status = np.asarray(mapped["status"], dtype=np.int8)
        lengths = np.asarray(mapped["length"], dtype=np.int64)
        truncated = np.asarray(mapped["truncated"], dtype=bool)
        trained = np.asarray(mapped["trained"], dtype=np.int64)
        keep = np.flatnonzero(status == OK)
        out = mapped.select(keep).remove_columns(["status", "truncated", "trained"])
        stats = TokenizeStats(
            rows_in=len(ds), rows_out=len(keep), overlong_dropped=int(np.sum(status == OVERLONG)),
            truncated=int(np.sum(truncated & (status == OK))), no_target_dropped=int(np.sum(status == NO_TARGET)),
            tokens=int(lengths[keep].sum()), trained_tokens=int(trained[keep].sum()), fingerprint=fp,
        )
        if use_cache:
            staging = root / f".tmp-save-{fp}-{os.getpid()}"
            out.save_to_disk(str(staging))
            (staging / "stats.json").write_text(json.dumps({k: v for k, v in asdict(stats).items()
                                                            if k not in ("cache_hit", "seconds")}))
            try:
                os.replace(staging, final)
            except OSError:  # another process finished first (final is a non-empty folder): keep its copy
                shutil.rmtree(staging, ignore_errors=True)
            out = load_from_disk(str(final))
        else:
            out = out.flatten_indices(keep_in_memory=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    stats.seconds = time.perf_counter() - t0
    log.info("tokenised %d rows in %.1fs (%.0f rows/s): kept %d, dropped %d over-long, truncated %d, dropped %d "
             "without trained tokens", stats.rows_in, stats.seconds, stats.rows_per_s, stats.rows_out,
             stats.overlong_dropped, stats.truncated, stats.no_target_dropped)
    return out, stats
