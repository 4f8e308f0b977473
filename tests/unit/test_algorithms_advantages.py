"""Group advantages: hand-computed values for every scale, identical-reward groups, errors."""

import math

import pytest
import torch

from stagewise.algorithms import ADVANTAGE_SCALES, group_advantages

# Three groups of 4 (prompt-major):
#   g0 = [1, 0, 0, 1]  mean 0.5,  centred [ .5, -.5, -.5, .5],   unbiased std = sqrt(4 * .25 / 3) = sqrt(1/3)
#   g1 = [2, 2, 2, 2]  identical -> advantage exactly 0
#   g2 = [0, 0, 0, 3]  mean 0.75, centred [-.75, -.75, -.75, 2.25], std = sqrt((3 * .5625 + 5.0625) / 3) = 1.5
# batch std of all 12: mean 13/12, sum of squares 27, var = (27 - 12 * (13/12)^2) / 11 = 12.91667 / 11,
#   std = sqrt(1.174242) = 1.083625
REWARDS = [1, 0, 0, 1, 2, 2, 2, 2, 0, 0, 0, 3]
S3 = math.sqrt(1 / 3)
BSTD = math.sqrt((27 - 169 / 12) / 11)
EXPECTED = {
    "group": [0.5 / S3, -0.5 / S3, -0.5 / S3, 0.5 / S3, 0, 0, 0, 0, -0.5, -0.5, -0.5, 1.5],
    "batch": [0.5 / BSTD, -0.5 / BSTD, -0.5 / BSTD, 0.5 / BSTD, 0, 0, 0, 0,
              -0.75 / BSTD, -0.75 / BSTD, -0.75 / BSTD, 2.25 / BSTD],
    "none": [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, -0.75, -0.75, -0.75, 2.25],
}


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_hand_computed_advantages(scale):
    adv, metrics = group_advantages(torch.tensor(REWARDS, dtype=torch.float32), 4, scale)
    assert adv.shape == (12,)
    torch.testing.assert_close(adv, torch.tensor(EXPECTED[scale]), atol=1e-5, rtol=1e-5)
    assert torch.equal(adv[4:8], torch.zeros(4))  # identical group: exactly zero, whatever the scale
    assert float(metrics["frac_reward_zero_std"]) == pytest.approx(1 / 3)
    assert float(metrics["reward_mean"]) == pytest.approx(13 / 12)
    assert float(metrics["reward_std"]) == pytest.approx((S3 + 0 + 1.5) / 3, rel=1e-6)  # mean per-group std
    assert float(metrics["reward_std_batch"]) == pytest.approx(BSTD, rel=1e-6)


def test_all_scales_registered():
    assert set(ADVANTAGE_SCALES) == {"group", "batch", "none"}


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("value", [0.1, 0.7, 1.0 / 3.0, -2.5, 1e6])
def test_identical_rewards_give_exact_zero_and_no_nan(scale, value):
    # mean([0.1] * 5) != 0.1 in float32; centring alone would leave ~1e-9 residues that std + eps inflates.
    rewards = torch.full((10,), value, dtype=torch.float32)
    adv, metrics = group_advantages(rewards, 5, scale)
    assert torch.equal(adv, torch.zeros(10))
    assert float(metrics["frac_reward_zero_std"]) == 1.0
    assert not torch.isnan(torch.stack(list(metrics.values())).float()).any()


def test_zero_std_group_next_to_a_varied_group_under_batch_scale():
    # g0 = [0.3, 0.3] identical, g1 = [0, 1]: batch std = std([.3, .3, 0, 1]) > 0 but g0 must stay exactly 0.
    # g1 centred [-.5, .5]; batch mean .4, squares .09 + .09 + 0 + 1 = 1.18, var = (1.18 - 4 * .16) / 3 = .18
    adv, _ = group_advantages(torch.tensor([0.3, 0.3, 0.0, 1.0]), 2, "batch")
    assert torch.equal(adv[:2], torch.zeros(2))
    torch.testing.assert_close(adv[2:], torch.tensor([-0.5, 0.5]) / math.sqrt(0.18), atol=1e-5, rtol=1e-5)


def test_group_size_one_is_all_zero():
    adv, metrics = group_advantages(torch.tensor([0.0, 1.0, 5.0]), 1, "group")
    assert torch.equal(adv, torch.zeros(3))
    assert float(metrics["frac_reward_zero_std"]) == 1.0


def test_integer_rewards_are_accepted():
    adv, _ = group_advantages(torch.tensor([0, 1]), 2, "none")
    assert adv.dtype == torch.float32
    assert adv.tolist() == [-0.5, 0.5]


def test_eps_bounds_a_tiny_spread():
    # g = [0, 2e-6]: centred [-1e-6, 1e-6], std = sqrt(2) * 1e-6; with eps = 1e-6 the advantage is
    # 1e-6 / (1.41421e-6 + 1e-6) = 0.414214, not the 0.7071 of an eps-free division.
    adv, _ = group_advantages(torch.tensor([0.0, 2e-6], dtype=torch.float64), 2, "group", eps=1e-6)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0], dtype=torch.float64) / (math.sqrt(2) + 1), rtol=1e-6,
                               atol=0)


@pytest.mark.parametrize(
    "rewards, group_size, scale, message",
    [
        ([1.0, 2.0, 3.0], 2, "group", "3 rewards cannot be split into groups of rollout.n=2"),
        ([1.0, 2.0], 2, "std", "algorithm.adv_scale='std' is not one of group, batch, none"),
        ([1.0, float("nan"), 0.0, 1.0], 2, "group", "rewards are not finite at rows [1]"),
    ],
)
def test_errors_name_the_problem(rewards, group_size, scale, message):
    with pytest.raises(ValueError) as err:
        group_advantages(torch.tensor(rewards), group_size, scale)
    assert message in str(err.value)
