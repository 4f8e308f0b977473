"""conf/algorithm/*.yaml: composed through the real train.yaml, each variant in one file, wired to the math."""

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from stagewise.algorithms import check_algorithm_config, group_advantages, policy_loss, PolicyLossSettings
from stagewise.config import PolicyGradientAlgorithm, SFTAlgorithm, register_configs

CONF = Path(__file__).resolve().parents[2] / "conf"
VARIANTS = ["grpo", "dr_grpo", "dapo", "gspo"]


@pytest.fixture(scope="module")
def composed():
    register_configs()
    out = {}
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for name in ["sft", *VARIANTS]:
            cfg = compose(config_name="train", overrides=[f"algorithm={name}"])
            out[name] = OmegaConf.to_object(cfg.algorithm)
    return out


# (adv_scale, ratio_level, clip_eps_low, clip_eps_high, loss_agg, filter_zero_std_groups, max_resample_rounds,
#  mask_truncated) as the papers set them
TABLE = {
    "grpo": ("group", "token", 0.2, 0.2, "seq_mean_token_mean", False, 0, False),
    "dr_grpo": ("none", "token", 0.2, 0.2, "seq_mean_token_sum_norm", False, 0, False),
    "dapo": ("group", "token", 0.2, 0.28, "token_mean", True, 3, True),
    "gspo": ("group", "sequence", 3e-4, 4e-4, "seq_mean_token_mean", False, 0, False),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_values(composed, name):
    cfg = composed[name]
    assert isinstance(cfg, PolicyGradientAlgorithm) and cfg.name == name
    got = (cfg.adv_scale, cfg.ratio_level, cfg.clip_eps_low, cfg.clip_eps_high, cfg.loss_agg,
           cfg.filter_zero_std_groups, cfg.max_resample_rounds, cfg.mask_truncated)
    assert got == TABLE[name]
    assert cfg.beta == 0.0 and cfg.dual_clip_c is None  # KL off by default, as in DeepAnalyze
    check_algorithm_config(cfg)


@pytest.mark.parametrize("name", ["sft", *VARIANTS])
def test_each_file_is_one_whole_variant(name):
    text = (CONF / "algorithm" / f"{name}.yaml").read_text()
    assert text.splitlines()[0] == "# @package algorithm"
    assert text.splitlines()[1].startswith("# ")  # header comment: the paper and what differs
    data = yaml.safe_load(text)
    schema = SFTAlgorithm if name == "sft" else PolicyGradientAlgorithm
    assert data.pop("defaults") == [f"base_{'sft' if name == 'sft' else 'policy_gradient'}", "_self_"]
    # every field set here, so no variant leans on defaults from elsewhere
    assert set(data) == {f.name for f in dataclasses.fields(schema)}


# The HAND example of test_algorithms_policy_loss (ratios seq0 [1, 1.5, .5] A = +1, seq1 [1.5, .5] A = -2) through
# each variant's settings, with rollout.max_new_tokens = 4:
#   grpo     seq_mean_token_mean, clip .2/.2                                     -> 0.7
#   dr_grpo  seq sums / 4, clip .2/.2                                            -> 0.2375
#   dapo     token_mean, clip .2/.28: seq0 t1 capped at 1.28 -> (1.9 - .08) / 5  -> 0.364
#   gspo     s0 = (1.5 * .5)^(1/3) = .908560 (< 1 - 3e-4 with A > 0: the min keeps the unclipped -s0)
#            s1 = (1.5 * .5)^(1/2) = .866025 (A < 0, < 0.9997 -> clipped: 2 * .9997 = 1.9994)
#            (-.908560 + 1.9994) / 2 = 0.545420
HAND = {"grpo": 0.7, "dr_grpo": 0.2375, "dapo": 0.364, "gspo": (-(0.75 ** (1 / 3)) + 2 * 0.9997) / 2}


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_drives_policy_loss(composed, name):
    lp = torch.log(torch.tensor([[1.0, 1.5, 0.5], [1.5, 0.5, 7.0]]))
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    settings = PolicyLossSettings.from_config(composed[name], max_new_tokens=4)
    assert settings.max_tokens == 4
    loss, _ = policy_loss(lp, torch.zeros(2, 3), torch.tensor([1.0, -2.0]), mask, **settings.as_kwargs())
    assert loss.item() == pytest.approx(HAND[name], abs=1e-6)


def test_dr_grpo_scale_is_none_in_advantages(composed):
    adv, _ = group_advantages(torch.tensor([0.0, 0.0, 0.0, 1.0]), 4, composed["dr_grpo"].adv_scale)
    assert adv.tolist() == [-0.25, -0.25, -0.25, 0.75]


def test_loss_agg_max_tokens_overrides_max_new_tokens():
    cfg = PolicyGradientAlgorithm(name="dr_grpo", loss_agg="seq_mean_token_sum_norm", loss_agg_max_tokens=1024)
    assert PolicyLossSettings.from_config(cfg, max_new_tokens=256).max_tokens == 1024


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(name="ppo"), "algorithm.name='ppo' is not one of sft, grpo, dr_grpo, dapo, gspo"),
        (dict(loss_agg="x"), "algorithm.loss_agg='x' is not one of token_mean, seq_mean_token_mean, "
                             "seq_mean_token_sum_norm"),
        (dict(adv_scale="std"), "algorithm.adv_scale='std' is not one of group, batch, none"),
        (dict(kl_estimator="low_var_kl"), "algorithm.kl_estimator='low_var_kl' is not one of k1, k2, k3"),
        (dict(ratio_level="seq"), "algorithm.ratio_level='seq' is not one of token, sequence"),
        (dict(clip_eps_high=-0.1), "algorithm.clip_eps_high=-0.1 must be >= 0"),
        (dict(dual_clip_c=0.5), "algorithm.dual_clip_c=0.5 must be > 1"),
        (dict(tis_cap=0.0), "algorithm.tis_cap=0.0 must be > 0"),
        (dict(beta=-0.01), "algorithm.beta=-0.01 must be >= 0"),
        (dict(max_resample_rounds=2), "needs algorithm.filter_zero_std_groups=true"),
        (dict(loss_agg_max_tokens=0), "algorithm.loss_agg_max_tokens=0 must be > 0"),
    ],
)
def test_bad_config_values_name_the_key(changes, message):
    cfg = dataclasses.replace(PolicyGradientAlgorithm(name="grpo"), **changes)
    with pytest.raises(ValueError) as err:
        check_algorithm_config(cfg)
    assert message in str(err.value)


def test_sft_has_no_policy_gradient_fields():
    check_algorithm_config(SFTAlgorithm())
    assert {f.name for f in dataclasses.fields(SFTAlgorithm)} == {"name"}
