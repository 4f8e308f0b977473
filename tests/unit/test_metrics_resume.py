"""After a kill and a resume, metrics.jsonl and the notebook's frame hold each step once.
The Tracker truncates the file on resume; ``runs.load_run`` also drops replayed records of files written without it."""

from __future__ import annotations

import json


from stagewise import runs
from stagewise.tracking.tracker import Tracker, truncate_metrics


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tracker_cfg():
    from stagewise.config import LoggerConfig, TrainConfig

    return TrainConfig(logger=LoggerConfig(sinks=["jsonl"]))


def killed_file(path):
    """An attempt that logged steps 1..6 (checkpoint at 4), was killed mid-write, and another stage's rows."""
    recs = [{"step": 0, "stage": "sft", "data/rows": 8}]
    recs += [{"step": s, "stage": "sft", "loss": 10.0 - s} for s in range(1, 7)]
    recs += [{"step": 5, "stage": "other", "x": 1}]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 7, "stage": "sf')


def test_tracker_truncates_rows_after_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    killed_file(path)
    with Tracker(tracker_cfg(), tmp_path, stage="sft", resume_step=4) as t:
        for s in (5, 6, 7):
            t.log({"loss": 100.0 + s}, step=s)
    got = rows(path)
    loss = [(r["step"], r["loss"]) for r in got if "loss" in r]
    assert loss == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0), (5, 105.0), (6, 106.0), (7, 107.0)]
    assert [r for r in got if r["stage"] == "other"] == [{"step": 5, "stage": "other", "x": 1}]  # other stage kept
    assert sum("data/rows" in r for r in got) == 1


def test_truncate_without_resume_step_keeps_the_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "stage": "sft", "loss": 1.0}) + "\n" for s in (1, 2, 3)))
    Tracker(tracker_cfg(), tmp_path, stage="sft").close()
    assert len(rows(path)) == 3
    assert truncate_metrics(path, "sft", 3) == 0 and len(rows(path)) == 3
    assert truncate_metrics(path, "sft", 1) == 2 and [r["step"] for r in rows(path)] == [1]


def test_load_run_keeps_the_last_occurrence_of_each_step(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    before = [{"step": 0, "stage": "sft", "data/rows": 8}, {"step": 0, "stage": "sft", "eval/accuracy": 0.1}]
    before += [{"step": s, "stage": "sft", "loss": 10.0 - s} for s in range(1, 5)]
    before += [{"step": 4, "stage": "sft", "eval/loss": 3.0}]  # eval and checkpoint at step 4
    before += [{"step": s, "stage": "sft", "loss": 10.0 - s} for s in (5, 6)]  # then killed
    after = [{"step": 4, "stage": "sft", "data/rows": 8}]  # resumed from the step-4 checkpoint
    after += [{"step": s, "stage": "sft", "loss": 100.0 + s} for s in range(5, 9)]
    # and a restart of another stage from scratch (no checkpoint): its step-0 records come twice
    again = [{"step": 0, "stage": "grpo", "eval/accuracy": 0.2}, {"step": 1, "stage": "grpo", "loss": 1.0},
             {"step": 0, "stage": "grpo", "eval/accuracy": 0.3}, {"step": 1, "stage": "grpo", "loss": 2.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in before + after + again))
    m = runs.load_run(run).metrics
    sft = m[m["stage"] == "sft"]
    train = sft[sft["loss"].notna()]
    assert train["step"].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert train["loss"].tolist() == [9.0, 8.0, 7.0, 6.0, 105.0, 106.0, 107.0, 108.0]
    assert sft["eval/loss"].dropna().tolist() == [3.0]  # a different record of step 4 is not a duplicate
    assert sft["eval/accuracy"].dropna().tolist() == [0.1]
    grpo = m[m["stage"] == "grpo"]
    assert grpo["eval/accuracy"].dropna().tolist() == [0.3] and grpo["loss"].dropna().tolist() == [2.0]
    assert runs.load_metrics(run)["step"].tolist() == m["step"].tolist()
    # a run that was never restarted is untouched
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in before))
    assert len(runs.load_run(run).metrics) == len(before)
