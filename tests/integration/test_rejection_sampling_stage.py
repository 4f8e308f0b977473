"""`python train.py stage=rejection_sampling` end to end on the tiny model with a hand-built reward: the SFT parquet
holds exactly the completions whose score is at or above the threshold, mixed with general data by ratio."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import REPO, only_run_dir, run_train

# A deterministic reward of the completion text alone, so the test can recompute every score independently.
REWARD = '''
def chars(completions, **columns):
    return [(sum(map(ord, c)) % 5) / 4 for c in completions]   # 0, 0.25, 0.5, 0.75 or 1
'''


def expected_score(text: str) -> float:
    return (sum(map(ord, text)) % 5) / 4


def test_keeps_exactly_the_completions_at_or_above_the_threshold(tmp_path):
    (tmp_path / "reward.py").write_text(REWARD)
    proc = run_train([
        "stage=rejection_sampling", "data=tiny_grpo", "data.eval_sources=[]",
        'data.sources=[{path:"generator:arithmetic",generator_kwargs:{n:8}}]',
        f"reward.functions=[{{name:'{tmp_path / 'reward.py'}:chars'}}]",
        "stage.acceptance_threshold=0.75", "stage.keep_truncated=true", "rollout.max_new_tokens=12",
        "stage.general_data_ratio=0.5",
        f"stage.general_sources=[{{path:'{REPO / 'tests/fixtures/data/messages.jsonl'}',adapter:messages}}]",
        "logger.progress_bar=false"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = only_run_dir(tmp_path)

    # every generated completion, rescored here: 8 prompts x 5 samples at the seed's sampling settings
    samples = pd.read_parquet(run / "samples" / "step_0.parquet")
    assert len(samples) == 40 and samples.groupby("prompt_index").size().tolist() == [5] * 8
    rescored = samples["completion"].map(expected_score)
    assert rescored.tolist() == pytest.approx(samples["score"].tolist())
    above = samples[rescored >= 0.75]
    expected = {(a, c) for a, c in zip(above["answer"], above["completion"])}
    assert 0 < len(expected) < 40  # the threshold splits this sample: the test can fail either way
    assert samples["accepted"].tolist() == (rescored >= 0.75).tolist()

    sft = pd.read_parquet(run / "sft.parquet")
    reasoning = sft[sft["kind"] == "reasoning"]
    got = {(a, m[-1]["content"]) for a, m in zip(reasoning["answer"], reasoning["messages"])}
    assert got == expected and len(reasoning) == len(expected)
    prompt_of = dict(zip(samples["completion"], samples["prompt"]))
    for m in reasoning["messages"]:
        assert [x["role"] for x in m] == ["system", "user", "assistant"]
        assert m[1]["content"] in prompt_of[m[-1]["content"]]  # the completion sits under its own prompt
    assert (reasoning["score"] >= 0.75).all()

    # general data: ratio 0.5 -> as many general rows as reasoning rows, drawn from the 3-row fixture
    general = sft[sft["kind"] == "general"]
    assert len(general) == len(reasoning)
    assert set(general["origin"]) == {"messages"} and general["score"].isna().all()

    summary = json.loads((run / "rejection_summary.json").read_text())
    assert summary["total"]["samples"] == 40 and summary["total"]["accepted"] == len(expected)
    assert summary["sources"]["arithmetic"]["acceptance_rate"] == pytest.approx(len(expected) / 40)
    assert summary["general"]["rows"] == len(general) and summary["rows"] == len(sft)
    result = json.loads((run / "result.json").read_text())
    assert result["rs/kept"] == len(expected) and result["rs/rows"] == len(sft)

