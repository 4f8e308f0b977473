"""Pipeline pieces: single-stage vs pipeline mode from the real config, override wiring, state, the shipped
pipelines compose stage by stage."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from stagewise.pipeline import (
    StageRecord,
    advance_wiring,
    expand_stage_refs,
    format_summary,
    load_state,
    passthrough_overrides,
    run_mode,
    save_state,
    stage_metrics,
    wiring_overrides,
)

from conftest import CONF_DIR, compose


def mode(overrides):
    cfg = compose(overrides, return_hydra_config=True)
    return run_mode(cfg, cfg.hydra.runtime.choices), cfg


def test_default_is_the_tiny_pipeline():
    m, cfg = mode([])
    assert m == "pipeline" and cfg.pipeline.name == "tiny"
    overrides = [list(s.overrides) for s in cfg.pipeline.stages]
    assert overrides == [["experiment=tiny/sft"], ["experiment=tiny/grpo"]]  # SFT warm-up, then GRPO
    assert [compose(o + ["pipeline=none"]).stage.name for o in overrides] == ["sft", "grpo"]


@pytest.mark.parametrize("overrides,stage", [
    (["stage=sft", "data=tiny_sft"], "sft"),
    (["stage=vocab"], "vocab"),
    (["stage=eval"], "eval"),
    (["stage=rejection_sampling"], "rejection_sampling"),
    (["experiment=deepscaler/qwen3_4b_lora"], "grpo"),
    (["experiment=r1/sft"], "sft"),
])
def test_choosing_a_stage_runs_that_stage_alone(overrides, stage):
    m, cfg = mode(overrides)
    assert m == "stage" and cfg.pipeline.name is None and cfg.stage.name == stage and not cfg.pipeline.stages


def test_stage_and_pipeline_together_or_neither_fail():
    with pytest.raises(ValueError, match="both pipeline=tiny and a stage"):
        mode(["pipeline=tiny", "stage=sft"])
    with pytest.raises(ValueError, match="no stage chosen"):
        mode(["pipeline=none"])
    # a config printed by --cfg job has no stage group: it runs as the stage it holds
    assert run_mode(OmegaConf.create({"pipeline": {"name": None}}), {}) == "stage"


def test_rejection_sampling_defaults_beat_the_rollout_preset_and_lose_to_the_command_line():
    for extra in ([], ["rollout=vllm"]):
        cfg = compose(["stage=rejection_sampling", *extra])
        assert (cfg.rollout.n, cfg.rollout.temperature, cfg.rollout.top_p) == (5, 0.7, 0.9)
        assert cfg.stage.acceptance_threshold == 0.8
    assert compose(["stage=rejection_sampling", "rollout.n=3"]).rollout.n == 3
    cfg = compose(["experiment=r1/rejection_sampling"])
    assert (cfg.rollout.n, cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.backend) == (5, 0.7, 0.9, "vllm")
    assert cfg.stage.general_data_ratio == 0.25 and cfg.reward.functions[0].name == "accuracy"


def test_passthrough_drops_the_pipeline_choice():
    assert passthrough_overrides(["pipeline=r1", "run_id=x", "hydra.verbose=true", "hardware=8xa100",
                                  "+pipeline.name=y", "seed=3", "hydra.searchpath=[file:///c]",
                                  "hydra/launcher=slurm"]) == \
        ["hardware=8xa100", "seed=3", "hydra.searchpath=[file:///c]"]


def test_wiring_model_and_rejection_sampling_data():
    assert wiring_overrides("grpo", ["stage=grpo"], "/r/00_sft/final", "/r/02_rs/sft.parquet") == \
        ["model.name_or_path=/r/00_sft/final"]
    assert wiring_overrides("sft", ["stage=sft"], "/r/01_rl/final", "/r/02_rs/sft.parquet") == \
        ["model.name_or_path=/r/01_rl/final", "data.sources=[{path:'/r/02_rs/sft.parquet',adapter:messages}]"]
    # explicit settings of the stage win
    assert wiring_overrides("sft", ["stage=sft", "model.name_or_path=base", "data.sources=[]"], "/m", "/p") == []
    assert wiring_overrides("vocab", ["stage=vocab"], None, None) == []


def test_advance_wiring_rejection_sampling_output_feeds_only_the_next_sft():
    model, rs = advance_wiring("grpo", {"final": "/r/01/final"}, "/r/00/final", None)
    assert (model, rs) == ("/r/01/final", None)
    model, rs = advance_wiring("rejection_sampling", {"sft_parquet": "/r/02/sft.parquet"}, model, rs)
    assert (model, rs) == ("/r/01/final", "/r/02/sft.parquet")  # no final/: the model stays
    model, rs = advance_wiring("eval", {}, model, rs)
    assert (model, rs) == ("/r/01/final", "/r/02/sft.parquet")  # eval changes nothing
    model, rs = advance_wiring("sft", {"final": "/r/03/final"}, model, rs)
    assert (model, rs) == ("/r/03/final", None)


def test_stage_folder_references():
    folders = {"rs": "/runs/p/02_rs"}
    assert expand_stage_refs(["data.sources=[{path:'@rs/sft.parquet'}]", "seed=1"], folders, "rl") == \
        ["data.sources=[{path:'/runs/p/02_rs/sft.parquet'}]", "seed=1"]
    with pytest.raises(ValueError, match="'@later/' does not name an earlier stage"):
        expand_stage_refs(["x=@later/a"], folders, "rl")


def test_state_round_trip_and_metrics(tmp_path):
    rec = StageRecord(0, "sft", "sft", str(tmp_path / "00_sft"), 1.5, {"final": "f"}, {"eval/loss": 2.0}, ["stage=sft"])
    save_state(tmp_path, {"sft": rec})
    assert load_state(tmp_path) == {"sft": rec}
    (tmp_path / "pipeline_state.json").write_text("[]")
    with pytest.raises(ValueError, match="not a pipeline state file"):
        load_state(tmp_path)
    d = tmp_path / "s"
    d.mkdir()
    (d / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n" +
                                     json.dumps({"step": 2, "eval/accuracy": 0.5}) + "\n" +
                                     json.dumps({"step": 3, "eval/accuracy": 0.75}) + "\n")
    # the latest value of every key, plus the first held-out accuracy (the stage's baseline)
    assert stage_metrics(d) == {"step": 3, "loss": 3.0, "eval/accuracy": 0.75, "eval/accuracy_start": 0.5}
    (d / "result.json").write_text(json.dumps({"rs/rows": 7}))
    assert stage_metrics(d) == {"rs/rows": 7}
    line = format_summary("p", [StageRecord(0, "a", "eval", "", 2.0, {}, {"eval/accuracy": 0.25, "x": 1,
                                                                        "eval/loss": 1.23456})])
    assert "eval/accuracy=25.0%, eval/loss=1.235" in line and "x=" not in line


PIPELINES = sorted(p.stem for p in (CONF_DIR / "pipeline").glob("*.yaml") if p.stem != "none")


@pytest.mark.parametrize("name", PIPELINES)
def test_shipped_pipelines_compose_stage_by_stage(name):
    cfg = compose([f"pipeline={name}"])
    assert cfg.pipeline.name == name and cfg.pipeline.stages
    kinds = []
    for spec in cfg.pipeline.stages:
        for o in spec.overrides:
            if o.startswith("experiment="):
                path = CONF_DIR / "experiment" / f"{o.split('=', 1)[1]}.yaml"
                if not path.exists():
                    pytest.skip(f"{path.relative_to(CONF_DIR.parent)} is not written yet")
        refs = {s.name: f"/p/{s.name}" for s in cfg.pipeline.stages}
        stage_cfg = compose(expand_stage_refs(list(spec.overrides), refs, spec.name) + ["pipeline=none"],
                            return_hydra_config=True)
        assert stage_cfg.hydra.runtime.choices.stage, f"pipeline {name} stage {spec.name} chooses no stage"
        kinds.append(stage_cfg.stage.name)
    expected = {"r1": ["sft", "grpo", "rejection_sampling", "sft", "grpo"],
                "deepanalyze": ["vocab", "sft", "sft", "grpo"], "tiny": ["sft", "grpo"], "r1_zero_tiny": ["sft", "grpo"],
                "deepanalyze_tiny": ["vocab", "sft", "sft", "grpo"]}
    assert kinds == expected[name]


CHILD = ("import signal, sys, time\n"
         "signal.signal(signal.SIGUSR1, lambda s, f: sys.exit(10))\n"
         "signal.signal(signal.SIGTERM, lambda s, f: sys.exit(15))\n"
         "print('ready', flush=True)\n"
         "time.sleep(60)\n")


@pytest.mark.parametrize("sig, child_exit", [("SIGUSR1", 10), ("SIGTERM", 15)])
def test_a_signal_to_the_pipeline_is_recorded_and_forwarded_to_the_running_stage(sig, child_exit, capfd):
    """What the pipeline process does with SIGUSR1 and SIGTERM (the whole round trip through a real stage, for
    SIGUSR1, is test_pipeline_resume.py): the stage's process gets the same signal, the pipeline records it
    and says so once, and its own handlers are restored afterwards."""
    import os
    import signal
    import sys
    import time

    from stagewise.pipeline import ForwardSignals, StageProcess

    signum = getattr(signal, sig)
    before = signal.getsignal(signum)
    with ForwardSignals() as guard:
        with StageProcess([sys.executable, "-c", CHILD], env=dict(os.environ)) as stage:
            while "ready" not in capfd.readouterr().out:  # the child's handlers are in place
                assert stage.proc.poll() is None
                time.sleep(0.02)
            os.kill(os.getpid(), signum)  # to the pipeline process only
            assert stage.wait() == child_exit
        assert guard.received == signum
    assert f"pipeline got {sig}: forwarded to the running stage" in capfd.readouterr().err
    assert signal.getsignal(signum) == before
