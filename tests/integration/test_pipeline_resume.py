"""A three-stage pipeline (rejection sampling -> SFT -> eval) on the tiny model: rejection sampling's parquet becomes
SFT's data, SFT's final/ becomes eval's model, a failed stage stops the pipeline, and a rerun with the same run_id
skips the finished stages (their files untouched) and continues from the failed one."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import run_train

ARITH4 = 'data.sources=[{path:"generator:arithmetic",generator_kwargs:{n:4}}]'


def pipeline_yaml(tmp_path) -> str:
    rs = ["stage=rejection_sampling", "data=tiny_grpo", "data.eval_sources=[]", ARITH4, "rollout.n=2",
          "rollout.max_new_tokens=8", "stage.keep_truncated=true", "stage.acceptance_threshold=0.5",
          f"reward.functions=[{{name:'{tmp_path}/rewards.py:accept_all'}}]"]
    sft = ["stage=sft", "data=tiny_sft", "data.eval_sources=[]", "stage.max_steps=2", "hardware.per_device_batch_size=4"]
    ev = ["stage=eval", "data=tiny_grpo", "stage.num_eval_prompts=4", "rollout.max_new_tokens=8",
          f"reward.functions=[{{name:'{tmp_path}/later.py:even_length'}}]"]  # later.py does not exist yet
    return yaml.safe_dump({"name": "resume_test", "stages": [{"name": "rs", "overrides": rs},
                                                             {"name": "sft", "overrides": sft},
                                                             {"name": "ev", "overrides": ev}]})


@pytest.mark.slow
def test_rerun_skips_finished_stages_and_continues(tmp_path):
    (tmp_path / "rewards.py").write_text("def accept_all(completions, **kw):\n    return [1.0] * len(completions)\n")
    conf = tmp_path / "extra_conf" / "pipeline"
    conf.mkdir(parents=True)
    (conf / "resume_test.yaml").write_text(pipeline_yaml(tmp_path))
    args = ["pipeline=resume_test", f"hydra.searchpath=[file://{tmp_path / 'extra_conf'}]", "run_id=p1",
            "logger.progress_bar=false"]
    root = tmp_path / "outputs" / "train" / "p1"

    first = run_train(args, cwd=tmp_path)
    assert first.returncode != 0 and "pipeline stage 'ev' failed" in first.stderr + first.stdout
    state = json.loads((root / "pipeline_state.json").read_text())
    assert [r["name"] for r in state["finished"]] == ["rs", "sft"]
    assert not (root / "pipeline_summary.json").exists()
    # wiring: the SFT stage trained on the rejection-sampling parquet (and nothing else)
    sft_overrides = yaml.safe_load((root / "01_sft" / ".hydra" / "overrides.yaml").read_text())
    assert f"data.sources=[{{path:'{root}/00_rs/sft.parquet',adapter:messages}}]" in sft_overrides
    assert "pipeline=none" in sft_overrides and not any(o.startswith("model.name_or_path") for o in sft_overrides)
    rs_rows = json.loads((root / "00_rs" / "result.json").read_text())["rs/rows"]
    sft_first = json.loads((root / "01_sft" / "metrics.jsonl").read_text().splitlines()[0])
    assert rs_rows > 0 and sft_first["data/rows"] == rs_rows
    stamps = {p: p.stat().st_mtime_ns for p in (root / "00_rs" / "sft.parquet", root / "01_sft" / "final" /
                                                "model.safetensors", root / "01_sft" / "metrics.jsonl")}

    (tmp_path / "later.py").write_text("def even_length(completions, **kw):\n"
                                       "    return [float(len(c) % 2 == 0) for c in completions]\n")
    second = run_train(args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    log = second.stdout + second.stderr
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
    assert summary["rs"]["rs/rows"] == rs_rows
    assert "pipeline resume_test: done" in second.stdout
