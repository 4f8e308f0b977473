"""DeepSpeed is told the optimizer step the stage really takes (stagewise.training.accelerator's docstring)."""

from __future__ import annotations

import pytest

from conftest import compose
from stagewise.stages.grpo import micro_batches_per_update
from stagewise.training.accelerator import deepspeed_plugin

pytest.importorskip("deepspeed")


def test_sft_step_is_grad_accum_steps_micro_batches():
    cfg = compose(["stage=sft", "hardware.deepspeed.zero_stage=2", "hardware.per_device_batch_size=4",
                   "hardware.grad_accum_steps=3", "hardware.num_processes=2", "stage.max_grad_norm=0.5"])
    plugin = deepspeed_plugin(cfg.hardware, cfg.stage.max_grad_norm, cfg.hardware.grad_accum_steps)
    ds = plugin.deepspeed_config
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["train_batch_size"] == 4 * 3 * 2
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 2


def test_grpo_step_is_one_mini_batch_whatever_grad_accum_steps_says():
    # 4 prompts per mini-batch x 8 samples = 32 sequences, over 2 ranks = 16 each, in micro-batches of 8 -> 2
    cfg = compose(["stage=grpo", "stage.prompts_per_step=16", "stage.mini_batch_size=4", "rollout.n=8",
                   "hardware.deepspeed.zero_stage=3", "hardware.per_device_batch_size=8", "hardware.num_processes=2",
                   "hardware.grad_accum_steps=5"])
    hw = cfg.hardware
    accum = micro_batches_per_update(cfg.stage, cfg.rollout.n, hw.num_processes * hw.num_machines,
                                     hw.per_device_batch_size)
    assert accum == 2
    ds = deepspeed_plugin(hw, cfg.stage.max_grad_norm, accum).deepspeed_config
    assert ds["gradient_accumulation_steps"] == 2 and ds["train_batch_size"] == 32  # = 4 prompts x 8 samples


def test_grpo_on_policy_step_is_the_whole_rollout_batch():
    cfg = compose(["stage=grpo", "stage.prompts_per_step=16", "stage.mini_batch_size=0", "rollout.n=4",
                   "hardware.per_device_batch_size=8"])
    assert micro_batches_per_update(cfg.stage, cfg.rollout.n, 1, 8) == 8  # 16 x 4 = 64 sequences / 8


def test_no_plugin_without_zero():
    cfg = compose(["stage=sft"])
    assert cfg.hardware.deepspeed.zero_stage == 0
    assert deepspeed_plugin(cfg.hardware, 1.0, 1) is None
