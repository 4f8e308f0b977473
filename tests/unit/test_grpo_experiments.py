"""The GRPO experiment files compose, pass the stage's checks, and carry their seed's numbers."""

import pytest

from stagewise.rewards.runner import display_names
from stagewise.stages.grpo import StepPlan, check_config

from conftest import compose

# experiment -> {dotted key: value from the seed}
SEEDS = {
    "deepscaler/qwen3_4b_lora": {  # DeepScaleR
        "model.name_or_path": "Qwen/Qwen3-4B-Instruct-2507", "model.lora.enabled": True, "model.lora.r": 64,
        "model.lora.alpha": 32, "stage.learning_rate": 2e-5, "stage.prompts_per_step": 64,
        "stage.mini_batch_size": 32, "stage.max_steps": 50, "rollout.n": 5, "algorithm.name": "grpo",
        "rollout.backend": "vllm",
    },
    "r1_zero/qwen2_5_7b_countdown": {  # R1-Zero tutorial
        "model.name_or_path": "Qwen/Qwen2.5-7B-Instruct", "stage.learning_rate": 5e-5,
        "hardware.per_device_batch_size": 8, "hardware.grad_accum_steps": 2, "stage.logging_steps": 10,
        "stage.num_epochs": 1.0, "data.sources.0.path": "Jiayi-Pan/Countdown-Tasks-3to4",
    },
    "r1/reasoning_rl": {"stage.max_grad_norm": 1.0, "data.sources.0.path": "AI-MO/NuminaMath-TIR"},  # DeepSeek-R1
    "r1/utility_rl": {"stage.max_grad_norm": 1.0},
}
REWARDS = {
    "deepscaler/qwen3_4b_lora": ["answer_tag"],
    "r1_zero/qwen2_5_7b_countdown": ["countdown", "format", "reasoning_steps", "repetition_penalty"],
    "r1/reasoning_rl": ["accuracy", "format", "language_consistency"],
    "r1/utility_rl": ["accuracy", "format", "reward_model", "reward_model_2"],
}
WEIGHTS = {"r1/utility_rl": [0.2, 0.2, 0.3, 0.3]}  # DeepSeek-R1: 0.4 reasoning (accuracy + format) + 0.3 + 0.3


def get(cfg, dotted):
    node = cfg
    for part in dotted.split("."):
        node = node[int(part)] if part.isdigit() else node[part]
    return node


@pytest.mark.parametrize("experiment", sorted(SEEDS))
def test_experiment_has_the_recipe_numbers(experiment):
    cfg = compose([f"experiment={experiment}"])
    check_config(cfg)
    assert cfg.stage.name == "grpo"
    for key, value in SEEDS[experiment].items():
        assert get(cfg, key) == value, key
    assert display_names(cfg.reward.functions) == REWARDS[experiment]
    if experiment in WEIGHTS:
        assert [f.weight for f in cfg.reward.functions] == WEIGHTS[experiment]


def test_deepscaler_step_takes_two_optimizer_steps_of_160_samples():
    plan = StepPlan.build(compose(["experiment=deepscaler/qwen3_4b_lora"]), world=4, num_prompts=40_000)
    assert (plan.mini_batches, plan.updates_per_step, plan.total_steps) == (2, 2, 50)
    assert "2 mini-batch(es) of 32 prompts" in plan.describe()
    assert "each 5 micro-batch(es) of 8 x 4 process(es)" in plan.describe()  # 32 x 5 / 4 ranks / 8


def test_r1_zero_countdown_step_is_two_micro_batches_of_eight():
    """TRL's per-device batch of 8 completions x accumulation 2 = 2 prompts x 8 samples per optimizer step."""
    cfg = compose(["experiment=r1_zero/qwen2_5_7b_countdown"])
    plan = StepPlan.build(cfg, world=1, num_prompts=1000)
    assert plan.prompts_per_step * plan.n == 16 and plan.updates_per_step == 1
    assert "each 2 micro-batch(es) of 8 x 1 process(es)" in plan.describe()
