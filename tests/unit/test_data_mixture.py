"""Mixtures: per-source counts, upsampling, reproducibility, held-out data, system prompt override."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from stagewise.config import DataConfig, SourceConfig
from stagewise.data import load_sources
from stagewise.data.mixture import sample_indices

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "data"


def cfg(**kw):
    sources = kw.pop("sources", None) or [
        SourceConfig(path=str(FIX / "messages.jsonl"), num_samples=5),  # 3 rows -> all once + 2 of them again
        SourceConfig(path=str(FIX / "deepscaler.parquet"), ratio=2 / 3),  # round(2/3 * 3) = 2 rows
        SourceConfig(path="generator:arithmetic", generator_kwargs={"n": 10}),  # all 10
        SourceConfig(path=str(FIX / "deepanalyze_bad.jsonl"), adapter="deepanalyze", name="bad"),  # 2 good of 5
    ]
    return DataConfig(sources=sources, on_bad_row=kw.pop("on_bad_row", "skip"), **kw)


def _key(row):
    return (row["source"], row["messages"][-1]["content"], row["messages"][0]["content"])


def test_mixture_counts_and_report():
    splits = load_sources(cfg())
    table = [(r.name, r.adapter, r.rows_read, r.rows_skipped, r.rows_kept, r.rows_used) for r in splits.report.sources]
    assert table == [
        ("messages", "messages", 3, 0, 3, 5),
        ("deepscaler", "numina_tir", 3, 0, 3, 2),
        ("arithmetic", "numina_tir", 10, 0, 10, 10),
        ("bad", "deepanalyze", 5, 3, 2, 2),
    ]
    assert Counter(splits.train["source"]) == {"messages": 5, "deepscaler": 2, "arithmetic": 10, "bad": 2}
    assert splits.eval is None and (splits.report.train_rows, splits.report.eval_rows) == (19, 0)
    # upsampling repeats the whole source, then draws the remainder without replacement
    ids = Counter(i for i, s in zip(splits.train["id"], splits.train["source"]) if s == "messages")
    assert sorted(ids.values()) == [1, 2, 2] and set(ids) == {0, 1, 2}
    # passthrough columns are aligned across sources (null where a source lacks them)
    answers = [a for a, s in zip(splits.train["answer"], splits.train["source"]) if s == "messages"]
    assert answers == [None] * 5
    assert "bad" in splits.report.table() and "train rows 19, eval rows 0" in splits.report.table()


def test_mixture_is_reproducible_from_seed():
    a, b, c = load_sources(cfg()), load_sources(cfg()), load_sources(cfg(seed=1))
    rows_a, rows_b, rows_c = ([_key(r) for r in s.train] for s in (a, b, c))
    assert rows_a == rows_b and len(rows_a) == 19
    assert rows_a != rows_c  # another seed: another order (and other generated rows)


def test_bad_rows_in_a_mixture_raise_by_default():
    with pytest.raises(ValueError, match=r"deepanalyze_bad.jsonl: line 2: field 'messages\[1\].role'"):
        load_sources(cfg(on_bad_row="error"))


def test_eval_fraction_and_eval_sources():
    gen = [SourceConfig(path="generator:arithmetic", generator_kwargs={"n": 20})]
    s = load_sources(DataConfig(sources=gen, eval_fraction=0.25))
    assert (len(s.train), len(s.eval)) == (15, 5)
    assert not {r["problem"] for r in s.train} & {r["problem"] for r in s.eval}
    held = [SourceConfig(path="generator:arithmetic", split="test", generator_kwargs={"n": 7})]
    s = load_sources(DataConfig(sources=gen, eval_sources=held, eval_fraction=0.5))  # eval_sources win
    assert (len(s.train), len(s.eval), s.report.eval_rows) == (20, 7, 7)
    assert [r.name for r in s.report.eval_sources] == ["arithmetic"]


def test_system_prompt_override_replaces_the_data_own():
    src = [SourceConfig(path=str(FIX / "bespoke_stratos.parquet")), SourceConfig(path=str(FIX / "messages.jsonl"))]
    s = load_sources(DataConfig(sources=src, system_prompt="Be brief."))
    for row in s.train:
        assert row["messages"][0] == {"role": "system", "content": "Be brief."}
        assert [m["role"] for m in row["messages"]].count("system") == 1
    s = load_sources(DataConfig(sources=src, system_prompt=""))
    assert all(m["role"] != "system" for row in s.train for m in row["messages"])


def test_duplicate_source_names_get_suffixes():
    src = [SourceConfig(path="generator:arithmetic", generator_kwargs={"n": 3}),
           SourceConfig(path="generator:arithmetic", generator_kwargs={"n": 4, "seed": 9})]
    s = load_sources(DataConfig(sources=src))
    assert Counter(s.train["source"]) == {"arithmetic": 3, "arithmetic#2": 4}


@pytest.mark.parametrize(
    "n, num_samples, ratio, expected_len",
    [(10, None, None, 10), (10, 4, None, 4), (10, 25, None, 25), (10, None, 0.5, 5), (10, None, 1.5, 15),
     (10, 0, None, 0), (3, None, 0.1, 0)],
)
def test_sample_indices_sizes(n, num_samples, ratio, expected_len):
    idx = sample_indices(n, num_samples, ratio, np.random.default_rng(0), "x")
    assert len(idx) == expected_len
    counts = np.bincount(idx, minlength=n)
    assert counts.max() - counts.min() <= 1  # whole copies, then a remainder without replacement


def test_sample_indices_errors():
    with pytest.raises(ValueError, match="set num_samples or ratio, not both"):
        sample_indices(5, 2, 0.5, np.random.default_rng(0), "x")
    with pytest.raises(ValueError, match="3 rows requested but the source has no usable rows"):
        sample_indices(0, 3, None, np.random.default_rng(0), "x")
