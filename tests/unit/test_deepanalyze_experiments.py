"""Experiment files keep their own task_name, and the DeepAnalyze RL experiment carries their run's numbers."""

from pathlib import Path

import pytest
import yaml

from conftest import compose

CONF = Path(__file__).resolve().parents[2] / "conf"
EXPERIMENTS = sorted(p.relative_to(CONF / "experiment").with_suffix("").as_posix()
                     for p in (CONF / "experiment").rglob("*.yaml"))


def own_task_name(experiment: str) -> str:
    return yaml.safe_load((CONF / "experiment" / f"{experiment}.yaml").read_text())["task_name"]


def test_every_experiment_file_is_listed():
    assert "deepanalyze/rl" in EXPERIMENTS and "tiny/grpo" in EXPERIMENTS and len(EXPERIMENTS) >= 12


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_keeps_its_own_task_name(experiment):
    """train.yaml's `task_name: train` must not overwrite the experiment's (outputs/<task_name>/...)."""
    cfg = compose([f"experiment={experiment}"])
    assert cfg.task_name == own_task_name(experiment)
    assert cfg.task_name != "train"


def test_deepanalyze_rl_task_name_is_exact():
    assert compose(["experiment=deepanalyze/rl"]).task_name == "deepanalyze_rl"
    assert compose(["experiment=deepanalyze/vocab"]).task_name == "deepanalyze_vocab"


def test_deepanalyze_rl_matches_their_skyrl_run():
    """scripts/multi_rl.sh on top of SkyRL's ppo_base_config.yaml (https://github.com/ruc-datalab/DeepAnalyze)."""
    cfg = compose(["experiment=deepanalyze/rl"])
    assert cfg.algorithm.tis_cap is None  # use_tis: false
    assert cfg.algorithm.beta == 0.0  # use_kl_loss: false
    assert cfg.algorithm.loss_agg == "token_mean"
    assert (cfg.algorithm.clip_eps_low, cfg.algorithm.clip_eps_high) == (0.2, 0.2)
    assert cfg.algorithm.adv_scale == "group"  # grpo_norm_by_std: true
    assert cfg.rollout.gpu_memory_utilization == 0.5
    assert (cfg.rollout.n, cfg.rollout.top_p, cfg.rollout.max_new_tokens) == (5, 0.95, 32768)
    assert cfg.rollout.temperature == 1.0  # their 0.0 is a listed departure
    assert (cfg.stage.learning_rate, cfg.stage.prompts_per_step, cfg.stage.ppo_epochs) == (5e-7, 256, 1)
    assert (cfg.stage.weight_decay, cfg.stage.adam_beta2, cfg.stage.max_grad_norm) == (0.01, 0.999, 1.0)
    assert (cfg.stage.lr_scheduler, cfg.stage.warmup_ratio) == ("constant_with_warmup", 0.0)
    assert (cfg.stage.save_steps, cfg.stage.eval_steps, cfg.stage.num_epochs) == (1, 0, 1)
    assert (cfg.env.max_turns, cfg.env.max_context_tokens, cfg.env.timeout_s) == (30, 32768, 10.0)
    assert cfg.env.stateful is False
    assert cfg.data.max_prompt_length == 8000


def test_deepanalyze_rl_header_lists_the_departures():
    header = (CONF / "experiment" / "deepanalyze" / "rl.yaml").read_text().split("defaults:")[0]
    for fact in ("temperature 1.0", "max_ckpts_to_keep=-1", "ZeRO-3", "SkyRL's 42", "</Execute>", "gold `answer`"):
        assert fact in header, fact


@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS if e.startswith("deepanalyze/")])
def test_deepanalyze_headers_are_self_contained(experiment):
    text = (CONF / "experiment" / f"{experiment}.yaml").read_text()
    for ref in ("seed 000", "deepanalyze.md", "reference/", "issue "):
        assert ref not in text, ref
