"""Load ``data.sources`` into one chat dataset: read, adapt, validate, sample, mix, and report per source.

Each source gives ``num_samples`` rows or ``ratio`` x its size (neither: all rows). When more rows are asked for
than the source has, it is repeated whole and the remainder drawn without replacement, as ms-swift's
``dataset#N`` does (not i.i.d. with replacement, which would leave some rows out while others repeat). Sampling
uses ``numpy.random.default_rng([data.seed, source index])``, and the mixture is shuffled with ``data.seed``, so
the same config gives the same rows in the same order on every machine.

Held-out data: ``data.eval_sources`` when given, else ``data.eval_fraction`` of the mixture.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from datasets import Dataset, Features, Value, concatenate_datasets

from stagewise.config import DataConfig, SourceConfig
from stagewise.data.schema import (
    MESSAGES_FEATURE,
    BadRowError,
    RowError,
    aligned_features,
    apply_system_prompt,
)
from stagewise.data.sources import ADAPTERS, Adapter, detect_adapter
from stagewise.data.sources.readers import RawSource, read_source, source_stem

log = logging.getLogger(__name__)
MAX_REPORTED_ERRORS = 5


@dataclass
class SourceReport:
    name: str
    path: str
    adapter: str
    rows_read: int  # rows in the file (or generated)
    rows_skipped: int  # bad rows skipped (on_bad_row=skip)
    rows_kept: int  # rows_read - rows_skipped
    rows_used: int  # after num_samples / ratio: what this source contributes to the mixture
    errors: list[str] = field(default_factory=list)  # the first few bad-row messages


@dataclass
class MixtureReport:
    sources: list[SourceReport] = field(default_factory=list)
    eval_sources: list[SourceReport] = field(default_factory=list)
    train_rows: int = 0
    eval_rows: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        lines = [f"{'source':<28} {'adapter':<18} {'read':>9} {'skipped':>8} {'kept':>9} {'used':>9}"]
        for tag, reports in (("", self.sources), ("eval:", self.eval_sources)):
            for r in reports:
                lines.append(f"{(tag + r.name)[:28]:<28} {r.adapter:<18} {r.rows_read:>9} {r.rows_skipped:>8} "
                             f"{r.rows_kept:>9} {r.rows_used:>9}")
        lines.append(f"train rows {self.train_rows}, eval rows {self.eval_rows}")
        return "\n".join(lines)


@dataclass
class DataSplits:
    train: Dataset
    eval: Dataset | None
    report: MixtureReport


# ------------------------------------------------------------------------------------------------- adapting
def adapt_row(adapter: Adapter, row: dict[str, Any], system_prompt: str | None) -> dict[str, Any]:
    out = adapter.fn(row)
    out["messages"] = apply_system_prompt(out["messages"], system_prompt, override=True)
    return out


def _adapt_batch(batch: dict[str, list], indices: list[int], *, adapter_name: str, system_prompt: str | None,
                 where: str, passthrough: list[str]) -> dict[str, list]:
    adapter = ADAPTERS[adapter_name]
    keys = list(batch)
    out: dict[str, list] = {c: batch[c] for c in passthrough}
    out.update({"messages": [], "_row_problem": [], **{c: [] for c in adapter.adds}})
    for j, idx in enumerate(indices):
        try:
            res = adapt_row(adapter, {k: batch[k][j] for k in keys}, system_prompt)
            err = None
        except RowError as e:
            res, err = {"messages": []}, f"field {e.field!r}: {e}"  # `adapt` adds the file and the line
        out["messages"].append(res["messages"])
        out["_row_problem"].append(err)
        for c in adapter.adds:
            out[c].append(res.get(c))
    return out


def adapt(raw: RawSource, adapter: Adapter, *, where: str, data_cfg: DataConfig) -> tuple[Dataset, list[str]]:
    """Apply ``adapter`` to every row; return the adapted dataset (bad rows removed) and the bad-row messages.

    With ``on_bad_row=error`` the first bad row raises `BadRowError` (after the whole file is checked, so the
    message can say how many rows are bad).
    """
    if raw.dataset is not None:
        ds = raw.dataset
        passthrough = [c for c in ds.column_names if c not in adapter.consumes and c not in adapter.adds]
        features = Features({**{c: ds.features[c] for c in passthrough}, "messages": MESSAGES_FEATURE,
                             **adapter.adds, "_row_problem": Value("string")})
        ds = ds.map(
            _adapt_batch, batched=True, with_indices=True, remove_columns=ds.column_names, features=features,
            fn_kwargs=dict(adapter_name=adapter.name, system_prompt=data_cfg.system_prompt, where=where,
                           passthrough=passthrough),
            num_proc=data_cfg.num_proc if data_cfg.num_proc > 1 and len(ds) >= 2 * data_cfg.num_proc else None,
            desc=f"adapting {where}",
        )
        error_col = ds["_row_problem"]  # one entry per input row, in order (renamed from
        # "_error", which held "<file>: row <i>: ...": the new features key keeps old map caches from being reused)
        errors = [f"{where}: {raw.location(i)}: {e}" for i, e in enumerate(error_col) if e is not None]
        if errors:
            ds = ds.select(np.flatnonzero(np.asarray([e is None for e in error_col], dtype=bool)))
        ds = ds.remove_columns("_row_problem")
    else:  # reader fallback: python rows, each with its index in the file
        rows, errors = [], []
        for i, row in zip(raw.row_ids or [], raw.rows or []):
            try:
                res = adapt_row(adapter, row, data_cfg.system_prompt)
            except RowError as e:
                errors.append(f"{where}: {raw.location(i)}: field {e.field!r}: {e}")
                continue
            rows.append({**{k: v for k, v in row.items() if k not in adapter.consumes}, **res})
        ds = Dataset.from_list(rows) if rows else Dataset.from_dict({"messages": []})
        ds = ds.cast_column("messages", MESSAGES_FEATURE)
    if errors and data_cfg.on_bad_row != "skip":
        more = f" ({len(errors) - 1} more bad rows)" if len(errors) > 1 else ""
        raise BadRowError(f"{errors[0]}{more}; set data.on_bad_row=skip to skip bad rows")
    return ds, errors


# ------------------------------------------------------------------------------------------------ sampling
def sample_indices(n_rows: int, num_samples: int | None, ratio: float | None, rng: np.random.Generator,
                   where: str) -> np.ndarray:
    """Row indices for one source: all rows, ``num_samples`` rows, or ``round(ratio * n_rows)`` rows."""
    if num_samples is not None and ratio is not None:
        raise ValueError(f"data source {where}: set num_samples or ratio, not both")
    if num_samples is None and ratio is None:
        return np.arange(n_rows)
    k = num_samples if num_samples is not None else int(round(ratio * n_rows))
    if k < 0:
        raise ValueError(f"data source {where}: num_samples/ratio must be >= 0")
    if k and not n_rows:
        raise ValueError(f"data source {where}: {k} rows requested but the source has no usable rows")
    if not k:
        return np.arange(0)
    full, rest = divmod(k, n_rows)
    return np.concatenate([np.tile(np.arange(n_rows), full), rng.permutation(n_rows)[:rest]]).astype(np.int64)


# ------------------------------------------------------------------------------------------------- loading
def load_source(src: SourceConfig, data_cfg: DataConfig, index: int = 0, name: str | None = None,
                cache_dir: str | None = None) -> tuple[Dataset, SourceReport]:
    """One source -> (chat dataset with a ``source`` column, its report)."""
    name = name or src.name or source_stem(src.path)
    raw = read_source(src.path, src.split, seed=data_cfg.seed, generator_kwargs=dict(src.generator_kwargs or {}),
                      on_bad_row=data_cfg.on_bad_row, cache_dir=cache_dir)
    columns = raw.dataset.column_names if raw.dataset is not None else sorted({k for r in raw.rows or [] for k in r})
    adapter_name = src.adapter if src.adapter != "auto" else detect_adapter(columns, src.path)
    if adapter_name not in ADAPTERS:
        raise ValueError(f"data source {src.path}: unknown adapter {adapter_name!r} "
                         f"(available: auto, {', '.join(ADAPTERS)})")
    ds, errors = adapt(raw, ADAPTERS[adapter_name], where=src.path, data_cfg=data_cfg)
    errors = raw.errors + errors
    idx = sample_indices(len(ds), src.num_samples, src.ratio, np.random.default_rng([data_cfg.seed, index]),
                         src.path)
    if len(idx) != len(ds) or (len(idx) and (idx != np.arange(len(ds))).any()):
        ds = ds.select(idx)
    ds = ds.add_column("source", [name] * len(ds))
    report = SourceReport(name=name, path=src.path, adapter=adapter_name, rows_read=raw.num_rows,
                          rows_skipped=len(errors), rows_kept=raw.num_rows - len(errors), rows_used=len(ds),
                          errors=errors[:MAX_REPORTED_ERRORS])
    if errors:
        log.warning("%s: skipped %d bad rows, e.g. %s", src.path, len(errors), errors[0])
    return ds, report


def _unique_names(sources: list[SourceConfig]) -> list[str]:
    names, seen = [], {}
    for s in sources:
        base = s.name or source_stem(s.path)
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return names


def mix(datasets: list[Dataset]) -> Dataset:
    """Concatenate datasets whose passthrough columns differ: missing columns are added as nulls."""
    if len(datasets) == 1:
        return datasets[0]
    target = aligned_features(d.features for d in datasets)
    aligned = []
    for d in datasets:
        for col, feat in target.items():
            if col not in d.column_names:
                d = d.add_column(col, [None] * len(d), feature=feat)
            elif d.features[col] != feat:
                try:
                    d = d.cast_column(col, feat)
                except Exception as e:  # noqa: BLE001 - re-raised with the column and sources named
                    name = d[0]["source"] if len(d) else "?"
                    raise ValueError(f"column {col!r} is {d.features[col]} in source {name} but {feat} in an "
                                     f"earlier source, and cannot be cast: {e}") from e
        aligned.append(d.select_columns(list(target)))
    return concatenate_datasets(aligned)


def load_mixture(sources: list[SourceConfig], data_cfg: DataConfig, cache_dir: str | None = None,
                 index_offset: int = 0) -> tuple[Dataset, list[SourceReport]]:
    if not sources:
        raise ValueError("data.sources is empty: list at least one source (a file, an HF id or generator:<name>)")
    parts, reports = [], []
    for i, (src, name) in enumerate(zip(sources, _unique_names(sources))):
        ds, rep = load_source(src, data_cfg, index=index_offset + i, name=name, cache_dir=cache_dir)
        parts.append(ds)
        reports.append(rep)
    return mix(parts).shuffle(seed=data_cfg.seed), reports


def load_sources(data_cfg: DataConfig, cache_dir: str | None = None) -> DataSplits:
    """``data.sources`` (and held-out data) as chat datasets: ``messages``, ``source`` and passthrough columns."""
    train, reports = load_mixture(list(data_cfg.sources), data_cfg, cache_dir)
    report = MixtureReport(sources=reports)
    eval_ds = None
    if data_cfg.eval_sources:
        eval_ds, report.eval_sources = load_mixture(list(data_cfg.eval_sources), data_cfg, cache_dir,
                                                    index_offset=len(data_cfg.sources))
    elif data_cfg.eval_fraction > 0:
        if not 0 < data_cfg.eval_fraction < 1:
            raise ValueError(f"data.eval_fraction must be in (0, 1), got {data_cfg.eval_fraction}")
        parts = train.train_test_split(test_size=data_cfg.eval_fraction, seed=data_cfg.seed, shuffle=True)
        train, eval_ds = parts["train"], parts["test"]
    report.train_rows, report.eval_rows = len(train), len(eval_ds) if eval_ds is not None else 0
    log.info("data mixture:\n%s", report.table())
    return DataSplits(train=train, eval=eval_ds, report=report)
