"""A three-stage pipeline (rejection sampling -> SFT -> eval) on the tiny model, preempted and failed on its way:
- wiring: rejection sampling's parquet becomes SFT's data, SFT's final/ becomes eval's model;
- SIGUSR1 (what SLURM sends before a time limit) to the pipeline process mid-SFT is forwarded to the stage, which
  checkpoints and exits 75; the pipeline records it as interrupted in pipeline_state.json and exits 75 too (the
  requeue code, not "failed, exit 1");
- the rerun with the same run_id skips rejection sampling, resumes SFT from its checkpoint (its losses equal an SFT
  never interrupted), then eval fails (its reward file does not exist yet): the pipeline stops there, exit 1;
- the third run skips the finished stages (their files untouched) and runs eval.
SIGTERM takes the same path in the pipeline (tests/unit/test_pipeline.py) and in the stage
(tests/unit/test_preemption.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import REPO, metric_by_step, run_stage_in_process, run_train

ARITH4 = 'data.sources=[{path:"generator:arithmetic",generator_kwargs:{n:4}}]'
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
SFT = ["stage=sft", "data=tiny_sft", "data.eval_sources=[]", "stage.max_steps=40", "stage.logging_steps=1",
       "stage.save_steps=1000", "hardware.per_device_batch_size=4"]  # long enough to be signalled mid-stage


def pipeline_yaml(tmp_path) -> str:
    rs = ["stage=rejection_sampling", "data=tiny_grpo", "data.eval_sources=[]", ARITH4, "rollout.n=2",
          "rollout.max_new_tokens=8", "stage.keep_truncated=true", "stage.acceptance_threshold=0.5",
          f"reward.functions=[{{name:'{tmp_path}/rewards.py:accept_all'}}]"]
    ev = ["stage=eval", "data=tiny_grpo", "stage.num_eval_prompts=4", "rollout.max_new_tokens=8",
          f"reward.functions=[{{name:'{tmp_path}/later.py:even_length'}}]"]  # later.py does not exist yet
    return yaml.safe_dump({"name": "resume_test", "stages": [{"name": "rs", "overrides": rs},
                                                             {"name": "sft", "overrides": SFT},
                                                             {"name": "ev", "overrides": ev}]})


def signal_mid_sft(args: list[str], tmp_path, root) -> str:
    """Start the pipeline, send SIGUSR1 to the pipeline process once SFT has logged step 3, return its output."""
    env = {**os.environ, "PROJECT_ROOT": str(tmp_path), **ONE_THREAD}
    env.pop("STAGEWISE_RUN_ID", None)
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    try:
        while max(metric_by_step(root / "01_sft" / "metrics.jsonl", "loss"), default=0) < 3:  # SFT is training
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() - t0 < 400
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)  # to the pipeline process only
        out, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, out[-3000:]
    return out


@pytest.mark.slow
def test_preempted_then_failed_pipeline_resumes_skipping_finished_stages(tmp_path):
    (tmp_path / "rewards.py").write_text("def accept_all(completions, **kw):\n    return [1.0] * len(completions)\n")
    conf = tmp_path / "extra_conf" / "pipeline"
    conf.mkdir(parents=True)
    (conf / "resume_test.yaml").write_text(pipeline_yaml(tmp_path))
    args = ["pipeline=resume_test", f"hydra.searchpath=[file://{tmp_path / 'extra_conf'}]", "run_id=p1",
            "logger.progress_bar=false"]
    root = tmp_path / "outputs" / "train" / "p1"

    # 1. SIGUSR1 mid-SFT: the stage checkpoints, the pipeline exits 75 and says which stage to resume
    signal_mid_sft(args, tmp_path, root)
    state = json.loads((root / "pipeline_state.json").read_text())
    assert [r["name"] for r in state["finished"]] == ["rs"] and state["interrupted"]["name"] == "sft"
    assert state["interrupted"]["exit"] == 75 and state["interrupted"]["signal"] == "SIGUSR1"
    (saved,) = [p for p in (root / "01_sft" / "checkpoints").iterdir() if (p / "COMPLETE").exists()]
    assert state["interrupted"]["checkpoint"] == str(saved) and 3 <= int(saved.name.split("_")[1]) < 40
    assert not (root / "01_sft" / "final").exists() and not (root / "02_ev").exists()
    assert "exiting with code 75 for requeue" in (root / "train.log").read_text()

    # 2. the rerun resumes SFT from its checkpoint, then eval fails: finished stages are recorded, eval is not
    second = run_train(args, cwd=tmp_path, env=ONE_THREAD, timeout=900)
    assert second.returncode != 0 and "pipeline stage 'ev' failed" in second.stderr + second.stdout
    assert "[1/3] rs: finished earlier" in second.stdout + second.stderr
    assert f"resumed from {saved}" in (root / "01_sft" / "train.log").read_text()
    state = json.loads((root / "pipeline_state.json").read_text())
    assert [r["name"] for r in state["finished"]] == ["rs", "sft"] and state["interrupted"] is None
    assert not (root / "pipeline_summary.json").exists()
    # wiring: the SFT stage trained on the rejection-sampling parquet (and nothing else)
    rs_parquet = f"data.sources=[{{path:'{root}/00_rs/sft.parquet',adapter:messages}}]"
    sft_overrides = yaml.safe_load((root / "01_sft" / ".hydra" / "overrides.yaml").read_text())
    assert rs_parquet in sft_overrides
    assert "pipeline=none" in sft_overrides and not any(o.startswith("model.name_or_path") for o in sft_overrides)
    rs_rows = json.loads((root / "00_rs" / "result.json").read_text())["rs/rows"]
    sft_first = json.loads((root / "01_sft" / "metrics.jsonl").read_text().splitlines()[0])
    assert rs_rows > 0 and sft_first["data/rows"] == rs_rows
    # the interrupted-then-resumed SFT equals one never interrupted (run here, one thread as the pipeline's)
    straight = run_stage_in_process([*SFT, rs_parquet], tmp_path / "straight" / "01_sft", threads=1)
    got, want = (metric_by_step(d / "metrics.jsonl", "loss") for d in (root / "01_sft", straight))
    assert sorted(got) == list(range(1, 41)) and got == want

    # 3. with eval's reward file in place, the third run skips rs and sft (files untouched) and runs eval
    stamps = {p: p.stat().st_mtime_ns for p in (root / "00_rs" / "sft.parquet", root / "01_sft" / "final" /
                                                "model.safetensors", root / "01_sft" / "metrics.jsonl")}
    (tmp_path / "later.py").write_text("def even_length(completions, **kw):\n"
                                       "    return [float(len(c) % 2 == 0) for c in completions]\n")
    third = run_train(args, cwd=tmp_path)
    assert third.returncode == 0, third.stderr[-3000:]
    log = third.stdout + third.stderr
    assert "[1/3] rs: finished earlier" in log and "[2/3] sft: finished earlier" in log
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # finished stages were not rerun
    ev_overrides = yaml.safe_load((root / "02_ev" / ".hydra" / "overrides.yaml").read_text())
    assert f"model.name_or_path={root}/01_sft/final" in ev_overrides
    state = json.loads((root / "pipeline_state.json").read_text())
    assert [r["name"] for r in state["finished"]] == ["rs", "sft", "ev"]
    assert state["finished"][2]["outputs"] == {}  # eval hands nothing on
    summary = json.loads((root / "pipeline_summary.json").read_text())
    ev = json.loads((root / "02_ev" / "eval.json").read_text())["metrics"]
    assert summary["ev"]["eval/accuracy"] == ev["eval/accuracy"] and ev["eval/num_prompts"] == 4
    assert summary["rs"]["rs/rows"] == rs_rows and summary["sft"]["loss"] == want[40]
    assert "pipeline resume_test: done" in third.stdout
