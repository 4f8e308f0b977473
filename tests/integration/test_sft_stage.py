"""`python train.py stage=sft` end to end on the tiny model: exact accumulation and ZeRO-3 on two processes. That
SFT learns is checked by the default run's SFT stage (test_default_run.py), exact resume after kill -9
and Ctrl-C by test_interrupt_and_resume.py."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import only_run_dir, run_stage_in_process, run_train

ARITH = 'data.sources=[{path:"generator:arithmetic",generator_kwargs:{n:1000}}]'


def _losses(run) -> dict[int, float]:
    """step -> loss; a step logged twice (before a kill and after the resume) keeps its last value."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def _metric(run, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r}


def test_grad_accumulation_4x1_equals_1x4_and_a_token_budget(tmp_path):
    """The same 4 rows per step as one micro-batch, as 4 accumulated ones, and as micro-batches of at most 150
    tokens (``hardware.max_tokens_per_micro_batch``: two or three forwards of uneven row counts) give the same
    step losses and gradient norms."""
    common = ["stage=sft", ARITH, "stage.max_steps=3", "stage.logging_steps=1", "stage.learning_rate=1e-3",
              "stage.warmup_ratio=0", "logger.progress_bar=false"]
    runs = [run_stage_in_process([*common, *split], tmp_path / name) for name, split in (
        ("a", ["hardware.per_device_batch_size=4", "hardware.grad_accum_steps=1"]),
        ("b", ["hardware.per_device_batch_size=1", "hardware.grad_accum_steps=4"]),
        ("c", ["hardware.per_device_batch_size=4", "hardware.max_tokens_per_micro_batch=150"]))]
    la = _losses(runs[0])
    assert sorted(la) == [1, 2, 3]
    assert set(_metric(runs[2], "micro_batches").values()) <= {2, 3} and "micro_batches" not in _metric(runs[0], "loss")
    assert set(_metric(runs[2], "micro_batches_idle").values()) == {0}  # one process: nothing to keep in step
    # the loss of each step and the norm of its accumulated gradient agree; steps 2-3 also check the updates.
    # (Weights are not compared element-wise: Adam's first steps are ~lr*sign(g), so float-rounding noise in
    # near-zero gradient entries flips signs without meaning anything.)
    ga = _metric(runs[0], "grad_norm")
    for run in runs[1:]:
        lb, gb = _losses(run), _metric(run, "grad_norm")
        for step in la:
            assert la[step] == pytest.approx(lb[step], abs=2e-5), (la, lb)
            assert ga[step] == pytest.approx(gb[step], rel=1e-4), (ga, gb)


@pytest.mark.slow
def test_zero3_two_cpu_processes_train_and_save_a_plain_hf_model(tmp_path):
    """ZeRO-3 on 2 CPU processes, 8 rows per rank per step in micro-batches of at most 142 tokens (rows of 45-51
    tokens: two or three fit): the ranks need different numbers of forwards, and the one with fewer runs weight-0
    ones so that ZeRO's per-micro-batch collectives line up (a mismatch hangs), and the losses still equal one
    process's (below)."""
    proc = run_train(["stage=sft", ARITH, "hardware=cpu_2proc", "stage.max_steps=12", "stage.learning_rate=3e-3",
                      "stage.logging_steps=1", "hardware.per_device_batch_size=8",
                      "hardware.max_tokens_per_micro_batch=142"], cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    run = only_run_dir(tmp_path)
    losses = _losses(run)
    assert sorted(losses) == list(range(1, 13))
    assert sum(_metric(run, "micro_batches_idle").values()) > 0  # some step had uneven ranks
    assert losses[12] < losses[1] - 1.0, losses
    assert (run / "train.rank1.log").exists()  # both ranks wrote into the same run folder
    # DeepSpeed really ran (Accelerator(cpu=True) would silently have fallen back to DDP)
    assert "accelerator: DEEPSPEED, 2 process(es)" in (run / "train.log").read_text()
    cfg_text = (run / ".hydra" / "config.yaml").read_text()
    assert "zero_stage: 3" in cfg_text
    model = AutoModelForCausalLM.from_pretrained(run / "final", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(run / "final")
    ids = tok("What is 1 + 2 + 3?", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert sum(p.numel() for p in model.parameters()) > 2_000_000  # full weights, not a ZeRO-3 shard

    # the same 16 rows per step on one process without DeepSpeed give the same per-step losses: the loss is
    # normalised over both ranks' trained tokens, and ZeRO-3 partitioning changes no numbers
    ref = _losses(run_stage_in_process(["stage=sft", ARITH, "stage.max_steps=12", "stage.learning_rate=3e-3",
                                        "stage.logging_steps=1", "hardware.per_device_batch_size=16",
                                        "logger.progress_bar=false"], tmp_path / "single"))
    assert losses[1] == pytest.approx(ref[1], abs=1e-5)
    for step in range(2, 13):
        assert losses[step] == pytest.approx(ref[step], rel=2e-3), (step, losses, ref)
