"""benchmarks/learning.py's table: a stage's first/last held-out eval from real metrics.jsonl files, the RL margin,
and the mean and spread over runs (hand-computed)."""

from __future__ import annotations

import importlib.util
import json
import sys

from conftest import REPO

spec = importlib.util.spec_from_file_location("learning", REPO / "benchmarks" / "learning.py")
learning = importlib.util.module_from_spec(spec)
sys.modules["learning"] = learning  # dataclasses look their module up
spec.loader.exec_module(learning)


def write_stage(folder, rows):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_stage_curve_takes_first_and_last_eval_and_ignores_replayed_rows(tmp_path):
    d = write_stage(tmp_path / "01_grpo", [
        {"step": 0, "eval/accuracy": 0.25, "eval/completions/mean_length": 10.0},
        {"step": 5, "loss": 1.0},
        {"step": 10, "eval/accuracy": 0.5},
        {"step": 10, "eval/accuracy": 0.75, "eval/completions/mean_length": 28.0},  # replayed after a resume: last wins
    ])
    curve = learning.stage_curve(d)
    assert curve.name == "grpo"
    assert curve.start == {"step": 0, "eval/accuracy": 0.25, "eval/completions/mean_length": 10.0}
    assert curve.end["eval/accuracy"] == 0.75 and curve.end["eval/completions/mean_length"] == 28.0


def test_table_margins_mean_and_std(tmp_path):
    results = []
    for seed, (sft, grpo) in enumerate([(0.1, 0.7), (0.08, 0.6), (0.06, 0.76)]):
        root = tmp_path / f"s{seed}"
        stages = [learning.stage_curve(write_stage(root / "00_sft", [{"step": 0, "eval/accuracy": 0.0},
                                                                     {"step": 9, "eval/accuracy": sft}])),
                  learning.stage_curve(write_stage(root / "01_grpo", [{"step": 0, "eval/accuracy": sft},
                                                                      {"step": 30, "eval/accuracy": grpo}]))]
        results.append(learning.RunResult(seed, 1, 100.0 + seed, 0, str(root), stages))
    results.append(learning.RunResult(3, 2, 5.0, 1, "", [], "boom"))
    assert [round(learning.margin(r, "eval/accuracy"), 6) for r in results[:3]] == [0.6, 0.52, 0.7]
    text = learning.table(results, "eval/accuracy")
    assert "| 0 | 1 | 0.0 | 10.0 | 70.0 | +60.0 | - | - | - | - | 100 |" in text
    assert "| 3 | 2 | failed (exit 1): boom |" in text
    # margins 60, 52, 70: mean 60.67, sample std 9.02
    assert "over 3 run(s): mean +60.7 points, std 9.0, min +52.0, max +70.0" in text
