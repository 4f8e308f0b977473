"""notebooks/inspect_run.ipynb executed headless (nbclient + ipykernel) on run folders the test builds.

The GRPO sweep is synthetic but written the way the loops write it: .hydra/ from the real composed config,
metrics.jsonl through the real Tracker (so NaN is stored as "nan"), samples as parquet.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient
from omegaconf import OmegaConf

from conftest import REPO, compose
from stagewise.tracking import Tracker
from stagewise.tracking.alerts import TrendAlerts

NOTEBOOK = REPO / "notebooks" / "inspect_run.ipynb"
STEPS = 8
FNS = ("accuracy", "format")


def grpo_metrics(seed: int) -> list[dict]:
    """Rewards that rise with the step (faster for seed 1); step 3 has a NaN grad norm."""
    out = []
    for step in range(1, STEPS + 1):
        acc = min(1.0, 0.1 * step + 0.05 * seed)
        fmt = min(1.0, 0.5 + 0.05 * step)
        out.append({
            "loss": 0.05 - 0.004 * step, "lr": 1e-5, "epoch": step / STEPS, "policy_loss": 0.04 - 0.004 * step,
            "grad_norm": float("nan") if step == 3 else 0.5 + 0.01 * step, "kl": 0.001 * step,
            "entropy": 1.2 - 0.05 * step,
            **{f"reward/accuracy/{k}": v for k, v in (("mean", acc), ("std", 0.3), ("min", 0.0), ("max", 1.0))},
            **{f"reward/format/{k}": v for k, v in (("mean", fmt), ("std", 0.2), ("min", 0.0), ("max", 1.0))},
            "reward/total/mean": acc + fmt, "completions/mean_length": 100.0 + 5 * step,
            "quality/format_compliance": fmt, "quality/reasoning_indicators": 1.5, "time/step": 3.0,
            "perf/samples_per_s": 2.5, "memory/max_rss_gb": 1.2,
        })
    return out


def samples(step: int) -> pd.DataFrame:
    """The columns the GRPO stage writes (stagewise.tracking.samples)."""
    rewards = [0.0, 1.0, 0.5, 1.5, 2.0, 0.25, 1.0, 0.75]
    return pd.DataFrame({
        "step": step, "round": 0, "prompt_index": [i // 4 for i in range(8)], "sample": [i % 4 for i in range(8)],
        "prompt": [f"Using 3, 5, 7 make {step + i}" for i in range(8)],
        "completion": [f"<think>try {i}</think><answer>{step}-{i}</answer>" for i in range(8)],
        "reward_accuracy": [min(r, 1.0) for r in rewards],
        "reward_format": [1.0] * 8,
        "reward_total": rewards,
        "advantage": [r - sum(rewards) / 8 for r in rewards],
        "kept": True, "prompt_tokens": 20, "completion_tokens": [40 + i for i in range(8)],
        "completion_chars": [60 + i for i in range(8)], "truncated": False, "turns": 1,
    })


def agentic_samples(step: int) -> pd.DataFrame:
    """A multi-turn (env=code_sandbox) step: odd samples answer at once, even ones run code; sample 4 (the best,
    prompt 1 sample 0) runs it twice, the first time with an error."""
    df = samples(step).drop(columns=["reward_accuracy", "reward_format"])
    ok = "<Code>\nprint({v})\n</Code>\n<Execute>\n{v}\n\n</Execute>\n"
    err = "<Code>\nprint(x)\n</Code>\n<Execute>\n[Error]:\nNameError: name 'x' is not defined\n</Execute>\n"
    completions, calls = [], []
    for i in range(8):
        code = (err if i == 4 else "") + (ok.format(v=step * i) if i % 2 == 0 else "")
        completions.append(f"<Analyze>plan {i}</Analyze>\n{code}<Answer>Answer: {step * i}</Answer>")
        calls.append(code.count("<Code>"))
    return df.assign(completion=completions, reward_deepanalyze=df["reward_total"] / 2, turns=[c + 1 for c in calls],
                     code_calls=calls, code_errors=[int(i == 4) for i in range(8)], code_timeouts=0, answered=1,
                     finish_reason="answer", answer=[str(step * i) for i in range(8)],
                     completion_chars=[len(c) for c in completions])


def write_run(run_dir: Path, overrides: list[str], records: list[dict], stage: str,
              sample_steps: tuple[int, ...] = (), make_samples=samples) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(compose(overrides), run_dir / ".hydra" / "config.yaml")
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    alerts = TrendAlerts()
    from stagewise.config import LoggerConfig, TrainConfig

    cfg = TrainConfig(logger=LoggerConfig(sinks=["jsonl"]))
    with Tracker(cfg, run_dir, stage=stage) as tracker:
        for step, rec in enumerate(records, start=1):
            tracker.log({**rec, **alerts.check(rec, step)}, step=step)
    for step in sample_steps:
        (run_dir / "samples").mkdir(exist_ok=True)
        make_samples(step).to_parquet(run_dir / "samples" / f"step_{step}.parquet")


@pytest.fixture(scope="module")
def run_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    sweep = root / "outputs" / "train" / "multirun_test"
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
    for seed in (0, 1):
        write_run(sweep / str(seed), ["algorithm=grpo", "stage.name=grpo", f"seed={seed}"], grpo_metrics(seed), "grpo",
                  sample_steps=(4, 8))
    sft = root / "outputs" / "train" / "sft_only"
    write_run(sft, ["seed=0"], [{"loss": 2.0 - 0.1 * s, "lr": 1e-4, "grad_norm": 1.0} for s in range(1, 6)], "sft")
    return sweep, sft


def execute(run_dir: Path, monkeypatch, launched_from: Path | None = None) -> nbformat.NotebookNode:
    """Run the notebook on ``run_dir``; with ``launched_from``, as ``cd <launched_from> && STAGEWISE_RUN_DIR=<relative
    path> jupyter nbconvert --execute notebooks/inspect_run.ipynb`` does: the shell's $PWD is the launch folder and
    the kernel runs in notebooks/."""
    if launched_from is not None:
        monkeypatch.setenv("PWD", str(launched_from))
    monkeypatch.setenv("STAGEWISE_RUN_DIR", str(run_dir.relative_to(launched_from) if launched_from else run_dir))
    monkeypatch.delenv("STAGEWISE_SWEEP_DIR", raising=False)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the inline backend must draw
    nb = nbformat.read(NOTEBOOK, as_version=4)
    kernel_dir = NOTEBOOK.parent if launched_from is not None else run_dir
    NotebookClient(nb, timeout=180, kernel_name="python3",
                   resources={"metadata": {"path": str(kernel_dir)}}).execute()
    if os.environ.get("STAGEWISE_KEEP_NOTEBOOK"):  # debugging: keep the executed notebook
        nbformat.write(nb, os.path.join(os.environ["STAGEWISE_KEEP_NOTEBOOK"], run_dir.name + ".ipynb"))
    return nb


def figures(nb) -> list[int]:
    """Number of PNG figures per code cell."""
    return [sum("image/png" in o.get("data", {}) for o in c.get("outputs", []))
            for c in nb.cells if c.cell_type == "code"]


def text(nb) -> str:
    parts = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            parts.append(o.get("text", ""))
            parts.append(o.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    assert "STAGEWISE_RUN_DIR" in code[0].source


@pytest.mark.slow
def test_notebook_on_a_grpo_sweep_run(run_folders, monkeypatch):
    sweep, _ = run_folders
    nb = execute(sweep / "1", monkeypatch)
    # cells: params, load, curves (loss, reward, length, kl, entropy), report, rollouts, trajectory, sweep (1 plot)
    assert figures(nb) == [0, 0, 5, 0, 0, 0, 1]
    out = text(nb)
    assert "absent curves" not in out
    assert "stage      grpo   algorithm grpo" in out and "overrides  algorithm=grpo stage.name=grpo seed=1" in out
    assert "alerts fired on" in out and "alert/grad_norm_spike" in out  # the NaN grad norm at step 3
    # the table: accuracy at step 8 for seed 1 is min(1, 0.8 + 0.05) = 0.85
    assert "0.850 ± 0.300 [0.000, 1.000]" in out
    # rollout browser: last 3 sampled steps are 4 and 8; best has reward 2.0 (i=4), worst 0.0 (i=0)
    assert "=================== step 8: 8 samples" in out
    assert "--- best 1: reward_total=2.000  reward_accuracy=1.000  reward_format=1.000" in out
    assert "<answer>8-4</answer>" in out
    assert "--- worst 1: reward_total=0.000  reward_accuracy=0.000  reward_format=1.000" in out
    assert "<answer>8-0</answer>" in out
    # sweep comparison: both runs with their final total reward (seed 0: 0.8 + 0.9; seed 1: 0.85 + 0.9)
    assert "final reward/total/mean: 0=1.7, 1=1.75" in out
    assert "no multi-turn trajectory in this run (single-turn samples)" in out


@pytest.mark.slow
def test_notebook_on_an_sft_only_run(run_folders, monkeypatch):
    """Also the README's command from the project folder, with a relative STAGEWISE_RUN_DIR (it failed: the kernel
    resolved it against notebooks/)."""
    _, sft = run_folders
    nb = execute(sft, monkeypatch, launched_from=sft.parents[2])
    assert figures(nb) == [0, 0, 1, 0, 0, 0, 0]  # only the loss curve
    out = text(nb)
    assert "absent curves: reward, length, kl, entropy (no rewards: an SFT-only or vocab run)" in out
    assert "no reward metrics in this run" in out
    assert f"no samples/step_<N>.parquet in {sft}" in out
    assert "not part of a sweep" in out
    assert "no samples: no trajectory to show" in out
    assert "no alerts fired" in out
    metrics = [json.loads(line) for line in (sft / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in metrics] == pytest.approx([1.9, 1.8, 1.7, 1.6, 1.5])
    assert not any(math.isnan(m["loss"]) for m in metrics)


@pytest.mark.slow
def test_notebook_on_a_pipeline_run(run_folders, monkeypatch):
    """A curriculum folder: its NN_<stage> runs are drawn side by side, one panel per stage on its own steps. Its GRPO
    stage is multi-turn: the notebook shows one trajectory with its Execute spans marked."""
    sweep, _ = run_folders
    root = sweep.parent / "pipeline_run"
    root.mkdir()
    (root / "pipeline_state.json").write_text(json.dumps({"finished": []}))
    write_run(root / "01_sft", ["seed=0"], [{"loss": 2.0 - 0.1 * s, "lr": 1e-4} for s in range(1, 4)], "sft")
    write_run(root / "02_grpo", ["algorithm=grpo", "stage.name=grpo", "seed=0"], grpo_metrics(0)[:4], "grpo",
              sample_steps=(4,), make_samples=agentic_samples)
    nb = execute(root, monkeypatch)
    assert figures(nb) == [0, 0, 5, 0, 0, 0, 0]
    out = text(nb)
    assert "pipeline ['01_sft', '02_grpo']" in out and "7 metric records" in out
    assert "=================== step 4: 8 samples" in out
    assert "not part of a sweep" in out
    # the trajectory: the best sample (reward 2.0) ran code twice; advantage 2.0 - 7/8
    assert ("step=4  prompt_index=1  sample=0  finish_reason=answer  turns=3  code_calls=2  code_errors=1  "
            "reward_deepanalyze=1.000  reward_total=2.000  advantage=1.125  answer='16'\n--- prompt\n"
            "Using 3, 5, 7 make 8\n--- completion\n<Analyze>plan 4</Analyze>\n") in out
    assert ("<Code>\nprint(x)\n</Code>\n▶ env ▶ <Execute>\n[Error]:\nNameError: name 'x' is not defined\n"
            "</Execute> ◀ env ◀\n<Code>\nprint(16)\n</Code>\n▶ env ▶ <Execute>\n16\n\n</Execute> ◀ env ◀\n"
            "<Answer>Answer: 16</Answer>") in out
