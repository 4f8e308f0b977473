"""stagewise.runs on hand-built run, sweep and pipeline folders with known contents."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from stagewise import runs


def write_run(path: Path, config: dict | None = None, overrides: list[str] | None = None,
              metrics: list[dict] | None = None, samples: dict[int, pd.DataFrame] | None = None,
              final: bool = False) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (path / ".hydra").mkdir(exist_ok=True)
        (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
        (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides or []))
    if metrics is not None:
        (path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    for step, df in (samples or {}).items():
        (path / "samples").mkdir(exist_ok=True)
        df.to_parquet(path / "samples" / f"step_{step}.parquet")
    if final:
        (path / "final").mkdir()
        (path / "final" / "config.json").write_text("{}")
    return path


def cfg(seed: int, lr: float = 1e-4) -> dict:
    return {"stage": {"name": "grpo", "learning_rate": lr}, "seed": seed, "run_id": "${stagewise_run_id:}",
            "paths": {"root_dir": "${oc.env:PROJECT_ROOT,.}", "output_dir": "${paths.root_dir}/outputs"},
            "algorithm": {"name": "grpo", "beta": 0.0}, "tags": ["a", "b"]}


# ---------------------------------------------------------------------------------------------------- config
def test_flatten_and_reference_resolution(tmp_path):
    assert runs.flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None, "f": {}}) == \
        {"a.b": 1, "a.c.d": [1, 2], "e": None, "f": {}}
    write_run(tmp_path, config={"a": {"b": 2}, "c": "${a.b}", "d": "x-${a.b}", "e": "${oc.env:HOME}",
                                "f": "${e}/y", "g": "${c}"})
    got = runs.load_config(tmp_path)
    # plain references resolved (c keeps the int type, g follows a chain); resolver calls kept as written
    assert got == {"a.b": 2, "c": 2, "d": "x-2", "e": "${oc.env:HOME}", "f": "${e}/y", "g": 2}


# --------------------------------------------------------------------------------------------------- metrics
def test_read_jsonl_nonfinite_strings_and_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "stage": "sft", "loss": 2.0, "grad_norm": "inf"}\n'
                    '{"step": 2, "stage": "sft", "loss": "nan", "grad_norm": 1.5}\n'
                    '{"step": 3, "stage": "sf')  # the job died while writing this line
    df = runs.read_jsonl(path)
    assert df["step"].tolist() == [1, 2]
    assert df["loss"].dtype == float and df["loss"][0] == 2.0 and math.isnan(df["loss"][1])
    assert df["grad_norm"].tolist() == [math.inf, 1.5]
    assert df["stage"].tolist() == ["sft", "sft"]


def test_read_jsonl_bad_middle_line_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{oops}\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2 is not valid JSON"):
        runs.read_jsonl(path)


# ----------------------------------------------------------------------------------------------------- sweep
def make_sweep(root: Path) -> Path:
    sweep = root / "outputs" / "train" / "multirun_abc"
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    write_run(sweep / "0", cfg(0), ["seed=0"], final=True, metrics=[
        {"step": 1, "stage": "grpo", "loss": 2.0, "reward/total/mean": 0.1},
        {"step": 2, "stage": "grpo", "loss": 1.5, "reward/total/mean": 0.3, "eval/loss": 1.7},
        {"step": 3, "stage": "grpo", "loss": "nan", "reward/total/mean": 0.4}])
    write_run(sweep / "1", cfg(1), ["seed=1"], metrics=[
        {"step": 1, "stage": "grpo", "loss": 1.9, "reward/total/mean": 0.2}])
    write_run(sweep / "10", cfg(10, lr=3e-4), ["seed=10", "stage.learning_rate=3e-4"], final=True, metrics=[
        {"step": 1, "stage": "grpo", "loss": 1.0, "reward/total/mean": 0.5},
        {"step": 2, "stage": "grpo", "loss": 0.9, "reward/total/mean": 0.6}])
    (sweep / ".submitit").mkdir()  # launcher logs, not a run
    return sweep


def test_load_sweep_table(tmp_path):
    sweep = make_sweep(tmp_path)
    assert [p.name for p in runs.find_runs(sweep)] == ["0", "1", "10"]  # natural order, .submitit skipped
    assert runs.is_sweep_dir(sweep) and not runs.is_sweep_dir(sweep / "0")
    table = runs.load_sweep(sweep)
    assert table["run"].tolist() == ["0", "1", "10"]
    assert table["complete"].tolist() == [True, False, True]
    assert table["last_step"].tolist() == [3, 1, 2]
    # only the keys that differ between runs become columns (run_id is per-run bookkeeping)
    assert [c for c in table.columns if "." in c or c == "seed"] == ["seed", "stage.learning_rate"]
    assert table["seed"].tolist() == [0, 1, 10]
    assert table["stage.learning_rate"].tolist() == [1e-4, 1e-4, 3e-4]
    # final = last logged non-missing value: run 0's loss went nan at step 3, its last finite loss is 1.5
    assert table["loss"].tolist() == [1.5, 1.9, 0.9]
    assert table["reward/total/mean"].tolist() == [0.4, 0.2, 0.6]
    assert table["eval/loss"].iloc[0] == 1.7 and table["eval/loss"].iloc[1:].isna().all()


def test_load_metrics_over_a_tree_and_load_run(tmp_path):
    sweep = make_sweep(tmp_path)
    all_metrics = runs.load_metrics(tmp_path / "outputs")
    assert all_metrics.groupby("run", sort=False).size().to_dict() == {
        "train/multirun_abc/0": 3, "train/multirun_abc/1": 1, "train/multirun_abc/10": 2}
    run = runs.load_run(sweep / "10")
    assert run.name == "10" and run.complete and run.last_step == 2
    assert run.overrides == ["seed=10", "stage.learning_rate=3e-4"]
    assert run.config["stage.learning_rate"] == 3e-4 and run.config["tags"] == ["a", "b"]
    assert run.config["run_id"] == "${stagewise_run_id:}"  # never resolved in the reading process
    assert run.metrics["loss"].tolist() == [1.0, 0.9]
    with pytest.raises(ValueError, match="is not a run folder"):
        runs.load_run(sweep)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        runs.load_run(tmp_path / "nope")


# -------------------------------------------------------------------------------------------------- pipeline
def test_pipeline_folder(tmp_path):
    root = tmp_path / "outputs" / "pipe" / "run1"
    write_run(root, {"pipeline": {"name": "tiny"}, "seed": 0})
    (root / "pipeline_state.json").write_text(json.dumps({"finished": []}))
    write_run(root / "00_vocab", {"stage": {"name": "vocab"}}, metrics=[{"step": 0, "stage": "vocab",
                                                                        "vocab/added": 10}], final=True)
    write_run(root / "01_sft", {"stage": {"name": "sft"}}, final=True, metrics=[
        {"step": s, "stage": "sft", "loss": 3.0 - s} for s in (1, 2, 3)])
    samples = pd.DataFrame({"prompt": ["p1", "p2"], "completion": ["a", "b"], "reward": [0.0, 1.0]})
    write_run(root / "02_grpo", {"stage": {"name": "grpo"}}, samples={2: samples}, metrics=[
        {"step": 1, "stage": "grpo", "reward/total/mean": 0.2}, {"step": 2, "stage": "grpo", "reward/total/mean": 0.4}])
    assert runs.find_runs(tmp_path / "outputs") == [root]  # the pipeline is one run, its stages are inside it
    run = runs.load_run(root)
    assert run.stages == ["00_vocab", "01_sft", "02_grpo"]
    assert not run.complete  # no pipeline_summary.json yet
    m = runs.with_global_step(run.metrics)
    assert m["pipeline_stage"].tolist() == ["00_vocab", "01_sft", "01_sft", "01_sft", "02_grpo", "02_grpo"]
    assert m["stage_index"].tolist() == [0, 1, 1, 1, 2, 2]
    assert m["global_step"].tolist() == [0, 1, 2, 3, 4, 5]
    s = run.samples
    assert s[["pipeline_stage", "step", "completion", "reward"]].values.tolist() == [
        ["02_grpo", 2, "a", 0.0], ["02_grpo", 2, "b", 1.0]]
    (root / "pipeline_summary.json").write_text("{}")
    assert runs.load_run(root).complete


# ---------------------------------------------------------------------------------------- notebook helpers
def test_metric_families():
    cols = ["step", "stage", "loss", "loss_avg", "lr", "grad_norm", "reward/accuracy/mean", "reward/accuracy/std",
            "reward/total/mean", "eval/reward/total/mean", "completions/mean_length", "completions/max_length",
            "kl", "entropy/mean", "eval/loss", "alert/kl_blowup"]
    assert runs.metric_families(cols) == {
        "loss": ["loss", "loss_avg", "eval/loss"],
        "reward": ["reward/accuracy/mean", "reward/total/mean", "eval/reward/total/mean"],
        "length": ["completions/mean_length"],
        "kl": ["kl"],
        "entropy": ["entropy/mean"],
    }
    assert runs.metric_families(["step", "loss", "lr"]) == {"loss": ["loss"], "reward": [], "length": [], "kl": [],
                                                            "entropy": []}


def test_seed004_report():
    metrics = pd.DataFrame([
        {"step": 5, "stage": "grpo", "loss": 2.345, "lr": 5e-5, "epoch": 0.5, "policy_loss": 1.234, "kl": 0.01,
         "entropy": 0.089, "reward/accuracy/mean": 0.75, "reward/accuracy/std": 0.433, "reward/accuracy/min": 0.0,
         "reward/accuracy/max": 1.0, "reward/format/mean": 0.875, "reward/format/std": 0.331,
         "reward/format/min": 0.0, "reward/format/max": 1.0, "reward/total/mean": 1.625,
         "quality/format_compliance": 0.875, "completions/mean_length": 36.5, "completions/mean_chars": 145.3,
         "time/step": 3.24, "perf/samples_per_s": 2.5, "memory/gpu_max_allocated_gb": 4.32},
        {"step": 6, "stage": "grpo", "eval/loss": 2.0},  # an eval-only record: no rewards, no row
    ])
    report = runs.seed004_report(metrics)
    assert list(report.columns) == ["Step", "Loss", "LR", "Epoch", "Policy", "KL", "Entropy", "accuracy", "format",
                                    "total", "Format %", "Avg length", "Avg chars", "Step time (s)", "Samples/s",
                                    "Memory (GB)"]
    row = report.iloc[0]
    assert len(report) == 1 and row["Step"] == 5 and row["Loss"] == 2.345 and row["Policy"] == 1.234
    assert row["accuracy"] == " 0.750 ± 0.433 [0.000, 1.000]"
    assert row["format"] == " 0.875 ± 0.331 [0.000, 1.000]"
    assert row["total"] == " 1.625 ± n/a [n/a, n/a]"  # only the mean of the total is logged
    assert row["Format %"] == pytest.approx(87.5) and row["Avg length"] == 36.5 and row["Avg chars"] == 145.3
    assert row["Step time (s)"] == 3.24 and row["Samples/s"] == 2.5 and row["Memory (GB)"] == 4.32
    assert runs.seed004_report(pd.DataFrame([{"step": 1, "loss": 1.0}])).empty  # SFT: no report


def test_best_and_worst_per_step():
    samples = pd.DataFrame({
        "step": [1, 1, 1, 2, 2, 2],
        "completion": ["a", "b", "c", "d", "e", "f"],
        "reward": [0.2, 0.9, 0.5, 1.0, 1.0, 0.0],
    })
    got = runs.best_and_worst(samples, k=1)
    assert got[["step", "rank", "completion"]].values.tolist() == [
        [1, "best 1", "b"], [1, "worst 1", "a"], [2, "best 1", "d"], [2, "worst 1", "f"]]  # ties keep file order
    got2 = runs.best_and_worst(samples[samples.step == 1], k=2)
    assert got2["completion"].tolist() == ["b", "c", "a", "c"]
    with pytest.raises(KeyError, match="no score column"):
        runs.best_and_worst(samples.drop(columns=["reward"]))
    # the GRPO stage's columns: reward_total is the score, reward_<fn> the per-function rewards
    grpo = samples.rename(columns={"reward": "reward_accuracy"}).assign(reward_total=[1.0, 0.0, 3.0, 0.0, 0.0, 0.0])
    assert runs.score_column(grpo) == "reward_total" and runs.reward_columns(grpo) == ["reward_accuracy"]
    assert runs.best_and_worst(grpo[grpo.step == 1])["completion"].tolist() == ["c", "b"]


def test_load_samples_step_from_file_name(tmp_path):
    write_run(tmp_path / "r", {"seed": 0}, samples={
        8: pd.DataFrame({"completion": ["x"], "reward": [1.0]}),
        12: pd.DataFrame({"completion": ["y", "z"], "reward": [0.0, 0.5]})})
    s = runs.load_samples(tmp_path / "r")
    assert s[["step", "completion"]].values.tolist() == [[8, "x"], [12, "y"], [12, "z"]]
    assert runs.load_samples(tmp_path / "r", steps=[12])["completion"].tolist() == ["y", "z"]
    (tmp_path / "r" / "samples" / "step_13.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="step_13.parquet"):
        runs.load_samples(tmp_path / "r")


# ------------------------------------------------------------------------------------ agentic trajectories
TRAJECTORY = ("<Analyze>load it</Analyze>\n<Code>\nprint(x)\n</Code>\n"
              "<Execute>\n[Error]:\nNameError: name 'x' is not defined\n</Execute>\n"
              "<Code>\nprint(18)\n</Code>\n<Execute>\n18\n\n</Execute>\n<Answer>Answer: 18</Answer>")


def test_mark_execute_spans():
    assert runs.mark_execute_spans(TRAJECTORY) == (
        "<Analyze>load it</Analyze>\n<Code>\nprint(x)\n</Code>\n"
        "▶ env ▶ <Execute>\n[Error]:\nNameError: name 'x' is not defined\n</Execute> ◀ env ◀\n"
        "<Code>\nprint(18)\n</Code>\n▶ env ▶ <Execute>\n18\n\n</Execute> ◀ env ◀\n<Answer>Answer: 18</Answer>")
    assert runs.mark_execute_spans(TRAJECTORY, start="[", end="]") == TRAJECTORY.replace(
        "<Execute>", "[<Execute>").replace("</Execute>", "</Execute>]")
    plain = "<think>3 + 5 = 8</think><answer>8</answer>"  # a single-turn completion: unchanged
    assert runs.mark_execute_spans(plain) == plain
    # an <Execute> never closed is policy text (the env writes both tags, never a partial observation): unmarked
    cut = "<Code>\nprint(1)\n</Code>\n<Execute>\n1\n\n</Execute>\n<Understand>ok</Understand>\n<Execute>\n1"
    assert runs.mark_execute_spans(cut) == (
        "<Code>\nprint(1)\n</Code>\n▶ env ▶ <Execute>\n1\n\n</Execute> ◀ env ◀\n<Understand>ok</Understand>\n"
        "<Execute>\n1")
    # ... and so is one written before a real span: only the innermost <Execute>..</Execute> is marked
    assert runs.mark_execute_spans("<Execute> a <Execute>\n2\n</Execute>") == (
        "<Execute> a ▶ env ▶ <Execute>\n2\n</Execute> ◀ env ◀")


def test_trajectory_view():
    row = pd.Series({"step": 20, "round": 0, "prompt_index": 3, "sample": 1, "prompt": "Q" * 50 + "?",
                     "completion": TRAJECTORY, "reward_deepanalyze": 0.9, "reward_total": 0.9, "advantage": -0.25,
                     "kept": True, "turns": 3, "finish_reason": "answer", "code_calls": 2, "code_errors": 1,
                     "code_timeouts": 0, "answered": 1, "answer": "18"})
    view = runs.trajectory_view(row, prompt_chars=20)
    assert view.split("\n")[:4] == [
        "step=20  prompt_index=3  sample=1  finish_reason=answer  turns=3  code_calls=2  code_errors=1  "
        "reward_deepanalyze=0.900  reward_total=0.900  advantage=-0.250  answer='18'",
        "--- prompt",
        "QQQQQQQQQQ [… 31 chars …] QQQQQQQQQ?",
        "--- completion"]
    assert view.endswith("\n--- completion\n" + runs.mark_execute_spans(TRAJECTORY))
    # a single-turn row (no env columns, a missing reward, no gold): only what is there
    single = {"step": 1, "prompt_index": 0, "sample": 0, "completion": "<answer>8</answer>", "reward_accuracy": None,
              "reward_format": 1.0, "reward_total": 1.0, "turns": 1.0, "finish_reason": "stop"}
    assert runs.trajectory_view(single) == ("step=1  prompt_index=0  sample=0  finish_reason=stop  turns=1  "
                                            "reward_format=1.000  reward_total=1.000\n--- completion\n"
                                            "<answer>8</answer>")


def test_pick_trajectory():
    samples = pd.DataFrame({
        "step": [1, 1, 2, 2, 2, 2, 2],
        "sample": [0, 1, 0, 1, 2, 3, 4],
        "reward_total": [5.0, 0.0, 1.0, 1.0, 1.0, 0.5, 2.0],
        "code_calls": [9, 1, 1, 3, 3, 4, 0],
    })
    # step 2; sample 4 scores best but ran no code; of the best that did (1.0), most calls, first in file order
    picked = runs.pick_trajectory(samples)
    assert (picked["step"], picked["sample"]) == (2, 1)
    assert runs.pick_trajectory(samples.assign(code_calls=0)) is None
    assert runs.pick_trajectory(samples.drop(columns=["code_calls"])) is None  # a single-turn run
    assert runs.pick_trajectory(samples.iloc[:0]) is None
    # a pipeline: the last stage's samples first, even at a lower step
    staged = samples.assign(pipeline_stage=["02_grpo", "02_grpo"] + ["01_grpo"] * 5)
    assert runs.pick_trajectory(staged)["sample"] == 0 and runs.pick_trajectory(staged)["step"] == 1


def test_locate_run_resolves_against_the_launch_folder_and_finds_the_newest(tmp_path, monkeypatch):
    import os
    import time

    from stagewise.runs import locate_run

    for name in ("old", "new"):
        (tmp_path / "outputs" / "train" / name / ".hydra").mkdir(parents=True)
        (tmp_path / "outputs" / "train" / name / ".hydra" / "config.yaml").write_text("seed: 0\n")
        (tmp_path / "outputs" / "train" / name / "metrics.jsonl").write_text("")
        time.sleep(0.01)
    os.utime(tmp_path / "outputs" / "train" / "old", (time.time() - 100, time.time() - 100))
    elsewhere = tmp_path / "notebooks"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the kernel's folder
    assert locate_run("outputs/train/old", base=tmp_path) == tmp_path / "outputs" / "train" / "old"
    assert locate_run("", base=tmp_path) == tmp_path / "outputs" / "train" / "new"
    monkeypatch.setenv("PWD", str(tmp_path))
    assert locate_run("outputs/train/old") == tmp_path / "outputs" / "train" / "old"  # $PWD: where jupyter started
    with pytest.raises(FileNotFoundError, match="outputs/train/gone"):
        locate_run("outputs/train/gone")
    empty = tmp_path / "a" / "b"
    empty.mkdir(parents=True)
    monkeypatch.chdir(empty)
    with pytest.raises(FileNotFoundError, match="no runs under .*set STAGEWISE_RUN_DIR"):
        locate_run("", base=empty)
