"""A GRPO prompt file without an ``answer`` column while a reward needs it stops at data loading,
naming the column, the reward and the file; ``reward.allow_missing_columns=true`` lets it train (scoring None)."""

from __future__ import annotations

import json

import pytest

from conftest import run_train
from stagewise.config import RewardConfig, RewardFnConfig
from stagewise.rewards.runner import MissingColumnError, RewardRunner


def test_check_columns_names_column_reward_and_file():
    cfg = RewardConfig(functions=[RewardFnConfig(name="answer_tag", alias="accuracy"), RewardFnConfig(name="format"),
                                  RewardFnConfig(name="countdown")])
    with RewardRunner(cfg) as runner:
        runner.check_columns(["prompt", "answer", "nums", "target"], "the data file x.jsonl")  # all there: fine
        with pytest.raises(MissingColumnError) as e:
            runner.check_columns(["prompt", "nums"], "the data file x.jsonl")
        msg = str(e.value)
        assert "reward 'accuracy' needs the column 'answer' or 'solution'" in msg
        assert "reward 'countdown' needs the column 'target'" in msg and "x.jsonl" in msg and "format" not in msg
        runner.check_columns(["prompt"], "x", allow_missing=True)  # opt-in: a warning only


@pytest.mark.slow
def test_grpo_prompt_file_without_answer_stops_at_data_loading(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"problem": f"What is {i} + 1?"}) + "\n" for i in range(16)))
    args = ["stage=grpo", "data=tiny_grpo", f"data.sources=[{{path:'{prompts}'}}]", "data.eval_sources=[]",
            "reward=tiny", "stage.max_steps=1", "rollout.n=2", "stage.prompts_per_step=2", "rollout.max_new_tokens=8",
            "logger.progress_bar=false"]
    proc = run_train([*args, "run_id=stop"], cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1
    assert "reward 'accuracy' needs the column 'answer' or 'solution'" in proc.stderr and str(prompts) in proc.stderr
    run = tmp_path / "outputs" / "train" / "stop"
    assert not (run / "metrics.jsonl").exists() or '"loss"' not in (run / "metrics.jsonl").read_text()
    assert "MissingColumnError" in (run / "train.log").read_text()

    allowed = run_train([*args, "run_id=allowed", "reward.allow_missing_columns=true"], cwd=tmp_path,
                        env={"OMP_NUM_THREADS": "1"})
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    step = [json.loads(x) for x in (tmp_path / "outputs" / "train" / "allowed" / "metrics.jsonl").read_text()
            .splitlines() if '"loss"' in x][0]
    assert step["reward/accuracy/none"] == 4.0
