"""`python train.py stage=eval` end to end on the tiny model: eval.json's mean reward, accuracy and pass@k equal the
numbers recomputed here from its per-completion table with a hand-written reward and math.comb."""

from __future__ import annotations

import json
from math import comb

import pandas as pd
import pytest

from conftest import only_run_dir, run_stage_in_process, run_train

REWARD = '''
def chars(completions, **columns):
    return [(sum(map(ord, c)) % 5) / 4 for c in completions]
'''


def test_eval_reports_mean_reward_and_unbiased_pass_at_k(tmp_path):
    (tmp_path / "reward.py").write_text(REWARD)
    proc = run_train([
        "stage=eval", "data=tiny_grpo", "stage.num_eval_prompts=6", "stage.pass_k=[1,2,4]",
        f"reward.functions=[{{name:'{tmp_path / 'reward.py'}:chars'}}]", "stage.acceptance_threshold=0.75",
        "rollout.max_new_tokens=12", "rollout.temperature=1.0", "logger.progress_bar=false"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = only_run_dir(tmp_path)
    report = json.loads((run / "eval.json").read_text())
    m = report["metrics"]
    assert report["split"] == "eval" and report["settings"]["samples_per_prompt"] == 4
    assert not (run / "final").exists()  # eval changes no model

    table = pd.read_parquet(run / "samples" / "step_0.parquet")
    assert len(table) == 6 * 4 and sorted(table["prompt_index"].unique()) == list(range(6))
    score = table["completion"].map(lambda c: (sum(map(ord, c)) % 5) / 4)
    assert score.tolist() == pytest.approx(table["reward_total"].tolist())
    correct = (score >= 0.75).groupby(table["prompt_index"]).sum()
    assert m["eval/num_prompts"] == 6
    assert m["eval/reward/total/mean"] == pytest.approx(score.mean())
    assert m["eval/accuracy"] == pytest.approx((score >= 0.75).mean())
    assert 0 < m["eval/accuracy"] < 1  # the threshold splits the samples: these checks can fail
    for k in (1, 2, 4):
        want = sum(1 - comb(4 - c, k) / comb(4, k) for c in correct) / 6
        assert m[f"eval/pass@{k}"] == pytest.approx(want), k
    assert m["eval/pass@1"] <= m["eval/pass@2"] <= m["eval/pass@4"]
    assert json.loads((run / "result.json").read_text()) == m
    logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert logged["stage"] == "eval" and logged["eval/pass@4"] == pytest.approx(m["eval/pass@4"])


@pytest.mark.slow
def test_two_processes_give_the_single_process_numbers(tmp_path):
    """Greedy eval of 7 prompts (an odd count: one rank pads its share) on 2 CPU processes equals 1 process."""
    (tmp_path / "reward.py").write_text(REWARD)
    common = ["stage=eval", "data=tiny_grpo", "stage.num_eval_prompts=7", "rollout.max_new_tokens=12",
              f"reward.functions=[{{name:'{tmp_path / 'reward.py'}:chars'}}]", "logger.progress_bar=false"]
    proc = run_train([*common, "hardware=cpu_2proc"], cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {"cpu_2proc": only_run_dir(tmp_path),
            "cpu": run_stage_in_process([*common, "hardware=cpu"], tmp_path / "one_process", threads=1)}
    one, two = (json.loads((runs[h] / "eval.json").read_text())["metrics"] for h in ("cpu", "cpu_2proc"))
    assert one == two and one["eval/num_prompts"] == 7
    t1, t2 = (pd.read_parquet(runs[h] / "samples" / "step_0.parquet") for h in ("cpu", "cpu_2proc"))
    assert t1["prompt_index"].tolist() == list(range(7))
    assert t1[["prompt_index", "completion", "score"]].equals(t2[["prompt_index", "completion", "score"]])
