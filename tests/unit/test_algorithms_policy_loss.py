"""Policy loss: every aggregation, clip-higher, dual clip, GSPO, KL, TIS, entropy, micro-batch additivity."""

import math

import pytest
import torch

from stagewise.algorithms import (
    LOSS_AGGREGATIONS,
    kl_estimate,
    loss_normalizer,
    policy_loss,
    truncated_is_weights,
)

# ---------------------------------------------------------------------------------------------- shared example
# B = 2 sequences, T = 3, old log-probs 0, so ratio = exp(logprob). Sequence 1's last token is padding (mask 0)
# with a huge ratio 7.0 that must not show up anywhere.
#   seq 0: A = +1, ratios [1.0, 1.5, 0.5]     seq 1: A = -2, ratios [1.5, 0.5, (7.0 masked)]
# clip 0.2/0.2 -> clip(r) in [0.8, 1.2]; per token pg = max(-A r, -A clip(r)):
#   seq 0: -min(r, clip r)      = [-1.0, -1.2 (clipped), -0.5]          sum -2.7, 3 tokens
#   seq 1: 2 * max(r, clip r)   = [ 3.0,  1.6 (clipped)]                sum  4.6, 2 tokens
RATIOS = [[1.0, 1.5, 0.5], [1.5, 0.5, 7.0]]
MASK = [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
ADV = [1.0, -2.0]

# loss and d loss / d logprob (= -A r / normaliser for unclipped tokens, 0 for clipped ones) per aggregation
HAND = {
    # (-2.7 + 4.6) / 5 tokens = 0.38;  grads: seq0 t0 -1/5, t2 -.5/5; seq1 t0 2 * 1.5 / 5
    "token_mean": (0.38, [[-0.2, 0.0, -0.1], [0.6, 0.0, 0.0]]),
    # (-2.7 / 3 + 4.6 / 2) / 2 = (-0.9 + 2.3) / 2 = 0.7;  grads: -1/3/2, -.5/3/2; 3/2/2
    "seq_mean_token_mean": (0.7, [[-1 / 6, 0.0, -0.5 / 6], [0.75, 0.0, 0.0]]),
    # max_tokens 4: (-2.7 / 4 + 4.6 / 4) / 2 = 0.2375;  grads: -1/4/2, -.5/4/2; 3/4/2
    "seq_mean_token_sum_norm": (0.2375, [[-0.125, 0.0, -0.0625], [0.375, 0.0, 0.0]]),
}


def _inputs(ratios=RATIOS, mask=MASK, adv=ADV):
    logprobs = torch.log(torch.tensor(ratios)).requires_grad_()
    return logprobs, torch.zeros(len(ratios), len(ratios[0])), torch.tensor(adv), torch.tensor(mask)


@pytest.mark.parametrize("loss_agg", list(HAND))
def test_each_aggregation_matches_hand_values(loss_agg):
    lp, old, adv, mask = _inputs()
    loss, metrics = policy_loss(lp, old, adv, mask, clip_eps_low=0.2, clip_eps_high=0.2, loss_agg=loss_agg,
                                max_tokens=4)
    (grad,) = torch.autograd.grad(loss, lp)
    expected_loss, expected_grad = HAND[loss_agg]
    assert loss.item() == pytest.approx(expected_loss, abs=1e-6)
    torch.testing.assert_close(grad, torch.tensor(expected_grad), atol=1e-6, rtol=1e-6)
    assert float(metrics["pg_loss"]) == pytest.approx(expected_loss, abs=1e-6)
    # TRL's definitions: low = r < 1 - eps with A < 0 (seq1 t1), high = r > 1 + eps with A > 0 (seq0 t1).
    # seq0 t2 (r = 0.5, A > 0) is not clipped: the min picks the unclipped branch. 5 trained tokens.
    assert float(metrics["clip_ratio/low_mean"]) == pytest.approx(1 / 5)
    assert float(metrics["clip_ratio/high_mean"]) == pytest.approx(1 / 5)
    assert float(metrics["clip_ratio/region_mean"]) == pytest.approx(2 / 5)
    # ratios over trained tokens (1 + 1.5 + .5 + 1.5 + .5) / 5 = 1; max 1.5 (the masked 7.0 is ignored)
    assert float(metrics["ratio/mean"]) == pytest.approx(1.0)
    assert float(metrics["ratio/max"]) == pytest.approx(1.5)
    assert float(metrics["ratio/min"]) == pytest.approx(0.5)


def test_clip_higher_lets_positive_advantages_rise_further():
    # eps_high 0.28: seq0 t1 (r 1.5, A +1) is capped at 1.28 instead of 1.2 -> token sum 1.9 - 0.08 = 1.82 over 5.
    lp, old, adv, mask = _inputs()
    loss, metrics = policy_loss(lp, old, adv, mask, clip_eps_low=0.2, clip_eps_high=0.28, loss_agg="token_mean")
    assert loss.item() == pytest.approx(1.82 / 5, abs=1e-6)
    assert float(metrics["clip_ratio/high_mean"]) == pytest.approx(1 / 5)
    # r = 1.25 sits inside [0.8, 1.28]: unclipped, a nonzero gradient -A r / 1 token = -1.25
    lp2, old2, adv2, mask2 = _inputs(ratios=[[1.25]], mask=[[1.0]], adv=[1.0])
    for eps_high, expected_grad in [(0.2, 0.0), (0.28, -1.25)]:
        loss2, _ = policy_loss(lp2, old2, adv2, mask2, clip_eps_low=0.2, clip_eps_high=eps_high, loss_agg="token_mean")
        (grad,) = torch.autograd.grad(loss2, lp2)
        assert float(grad) == pytest.approx(expected_grad, abs=1e-6)


# seq 0: A = -1, ratios [2, 5, 0.5]; seq 1: A = +1, ratios [5, 1, 1]; dual clip c = 3, eps 0.2, 6 tokens.
#   seq0 plain: max(r, clip r) = [2, 5, 0.8]; dual caps at c * |A| = 3 -> [2, 3, 0.8]   (sum 5.8, plain 7.8)
#   seq1: -min(r, clip r) = [-1.2, -1, -1] (A > 0 never dual-clipped)                  (sum -3.2)
# token_mean: dual (5.8 - 3.2) / 6 = 0.433333; plain (7.8 - 3.2) / 6 = 0.766667
# grads (dual): seq0 t0 unclipped d(-A r) = r = 2 -> 2/6; t1 capped -> 0; t2 clipped -> 0;
#               seq1 t0 clipped -> 0; t1, t2 -> -1/6
DUAL = dict(ratios=[[2.0, 5.0, 0.5], [5.0, 1.0, 1.0]], mask=[[1.0] * 3] * 2, adv=[-1.0, 1.0])


@pytest.mark.parametrize(
    "dual_clip_c, expected_loss, expected_grad, dual_frac",
    [
        (3.0, 2.6 / 6, [[2 / 6, 0.0, 0.0], [0.0, -1 / 6, -1 / 6]], 1 / 6),
        (None, 4.6 / 6, [[2 / 6, 5 / 6, 0.0], [0.0, -1 / 6, -1 / 6]], None),
        (6.0, 4.6 / 6, [[2 / 6, 5 / 6, 0.0], [0.0, -1 / 6, -1 / 6]], 0.0),  # r = 5 < c = 6: cap inactive
    ],
)
def test_dual_clip(dual_clip_c, expected_loss, expected_grad, dual_frac):
    lp, old, adv, mask = _inputs(**DUAL)
    loss, metrics = policy_loss(lp, old, adv, mask, clip_eps_low=0.2, clip_eps_high=0.2, dual_clip_c=dual_clip_c,
                                loss_agg="token_mean")
    (grad,) = torch.autograd.grad(loss, lp)
    assert loss.item() == pytest.approx(expected_loss, abs=1e-6)
    torch.testing.assert_close(grad, torch.tensor(expected_grad), atol=1e-6, rtol=1e-6)
    if dual_frac is None:
        assert "clip_ratio/dual_mean" not in metrics
    else:
        assert float(metrics["clip_ratio/dual_mean"]) == pytest.approx(dual_frac)


# GSPO: log-ratios seq0 [0.3, -0.1, 0.1] (mean 0.1), seq1 [0.2, -0.4, (5.0 masked)] (mean -0.1)
#   s0 = exp(0.1) = 1.105171, s1 = exp(-0.1) = 0.904837, shared by every token of the sequence.
GSPO_LOG_RATIOS = [[0.3, -0.1, 0.1], [0.2, -0.4, 5.0]]


def test_gspo_sequence_ratio_value_and_gradient():
    lp = torch.tensor(GSPO_LOG_RATIOS).requires_grad_()
    old, adv, mask = torch.zeros(2, 3), torch.tensor([1.0, -1.0]), torch.tensor(MASK)
    loss, metrics = policy_loss(lp, old, adv, mask, ratio_level="sequence", clip_eps_low=0.2, clip_eps_high=0.2,
                                loss_agg="seq_mean_token_mean")
    s0, s1 = math.exp(0.1), math.exp(-0.1)
    # both inside [0.8, 1.2]: per-token loss -A s -> seq0 -s0, seq1 +s1; mean over the 2 sequences
    assert loss.item() == pytest.approx((-s0 + s1) / 2, abs=1e-6)
    # GSPO eq. 10: d/d logp_{i,t} = (1/G) * (-A_i) * s_i / |y_i|
    (grad,) = torch.autograd.grad(loss, lp)
    expected = [[-s0 / 3 / 2] * 3, [s1 / 2 / 2, s1 / 2 / 2, 0.0]]
    torch.testing.assert_close(grad, torch.tensor(expected), atol=1e-6, rtol=1e-6)
    assert float(metrics["ratio/mean"]) == pytest.approx((3 * s0 + 2 * s1) / 5, rel=1e-6)
    assert float(metrics["ratio/max"]) == pytest.approx(s0, rel=1e-6)
    assert float(metrics["ratio/min"]) == pytest.approx(s1, rel=1e-6)


def test_gspo_paper_clip_range():
    # clip 3e-4 / 4e-4: s0 = 1.105 > 1.0004 with A > 0 -> pg -1.0004 (high-clipped, 3 tokens);
    # s1 = 0.905 < 0.9997 with A < 0 -> pg +0.9997 (low-clipped, 2 tokens). loss (-1.0004 + 0.9997) / 2, no gradient.
    lp = torch.tensor(GSPO_LOG_RATIOS).requires_grad_()
    loss, metrics = policy_loss(lp, torch.zeros(2, 3), torch.tensor([1.0, -1.0]), torch.tensor(MASK),
                                ratio_level="sequence", clip_eps_low=3e-4, clip_eps_high=4e-4,
                                loss_agg="seq_mean_token_mean")
    assert loss.item() == pytest.approx((-1.0004 + 0.9997) / 2, abs=1e-6)
    (grad,) = torch.autograd.grad(loss, lp)
    assert torch.equal(grad, torch.zeros(2, 3))
    assert float(metrics["clip_ratio/high_mean"]) == pytest.approx(3 / 5)
    assert float(metrics["clip_ratio/low_mean"]) == pytest.approx(2 / 5)
    assert float(metrics["clip_ratio/region_mean"]) == pytest.approx(1.0)


def test_gspo_and_grpo_differ_on_the_same_tokens():
    # token level with the same inputs: seq0 ratios e^.3, e^-.1, e^.1 (e^.3 = 1.35 clipped to 1.2):
    #   seq0 mean -(1.2 + e^-.1 + e^.1) / 3; seq1 A = -1: max(r, clip): max(e^.2, .8), max(e^-.4 = .67, .8) = .8
    lp = torch.tensor(GSPO_LOG_RATIOS)
    args = (lp, torch.zeros(2, 3), torch.tensor([1.0, -1.0]), torch.tensor(MASK))
    token, _ = policy_loss(*args, ratio_level="token", loss_agg="seq_mean_token_mean")
    seq0 = -(1.2 + math.exp(-0.1) + math.exp(0.1)) / 3
    seq1 = (math.exp(0.2) + 0.8) / 2
    assert token.item() == pytest.approx((seq0 + seq1) / 2, abs=1e-6)
    sequence, _ = policy_loss(*args, ratio_level="sequence", loss_agg="seq_mean_token_mean")
    assert sequence.item() == pytest.approx((-math.exp(0.1) + math.exp(-0.1)) / 2, abs=1e-6)


# ------------------------------------------------------------------------------------------------------ KL
# logprobs [-1, -2], ref [-1.5, -1]: log r = ref - lp = [-0.5, 1.0]
#   k1 = lp - ref            = [0.5, -1.0]
#   k2 = 0.5 (lp - ref)^2    = [0.125, 0.5]
#   k3 = e^log_r - log_r - 1 = [e^-.5 - .5 = 0.1065307, e - 2 = 0.7182818]
KL_HAND = {
    "k1": [0.5, -1.0],
    "k2": [0.125, 0.5],
    "k3": [math.exp(-0.5) - 0.5, math.e - 2.0],
}


@pytest.mark.parametrize("estimator", list(KL_HAND))
def test_kl_estimators(estimator):
    kl = kl_estimate(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0]), estimator)
    torch.testing.assert_close(kl, torch.tensor(KL_HAND[estimator]), atol=1e-6, rtol=1e-6)


def test_kl_is_zero_at_the_reference_and_k3_nonnegative():
    lp = torch.linspace(-5, -0.1, 11)
    for est in ("k1", "k2", "k3"):
        assert torch.equal(kl_estimate(lp, lp, est), torch.zeros(11))
    assert (kl_estimate(lp, lp.flip(0), "k3") >= 0).all()
    with pytest.raises(ValueError, match="algorithm.kl_estimator='k4' is not one of k1, k2, k3"):
        kl_estimate(lp, lp, "k4")


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_term_in_loss(estimator):
    # ratio 1 and A = 0 -> pg = 0, so loss = beta * token mean of KL; beta 0.1
    lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0]])
    loss, metrics = policy_loss(lp, lp.detach(), torch.zeros(1), torch.ones(1, 2), loss_agg="token_mean",
                                ref_logprobs=ref, beta=0.1, kl_estimator=estimator)
    kl_mean = sum(KL_HAND[estimator]) / 2  # k1: -0.25; k3: 0.4124063
    assert loss.item() == pytest.approx(0.1 * kl_mean, abs=1e-7)
    assert float(metrics["kl"]) == pytest.approx(kl_mean, abs=1e-6)
    (grad,) = torch.autograd.grad(loss, lp)
    # d k1 / d lp = 1;  d k3 / d lp = 1 - e^(ref - lp) = [1 - e^-.5, 1 - e]; times beta / 2 tokens
    per_token = [1.0, 1.0] if estimator == "k1" else [1 - math.exp(-0.5), 1 - math.e]
    torch.testing.assert_close(grad, 0.05 * torch.tensor([per_token]), atol=1e-6, rtol=1e-6)


def test_kl_measured_but_not_added_when_beta_is_zero():
    lp = torch.tensor([[-1.0, -2.0]])
    loss, metrics = policy_loss(lp, lp, torch.zeros(1), torch.ones(1, 2), ref_logprobs=torch.tensor([[-1.5, -1.0]]))
    assert loss.item() == 0.0
    assert float(metrics["kl"]) == pytest.approx((math.exp(-0.5) - 0.5 + math.e - 2) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        policy_loss(lp, lp, torch.zeros(1), torch.ones(1, 2), beta=0.04)


# ----------------------------------------------------------------------------------------------------- TIS
def test_truncated_is_weights_values_and_use_in_loss():
    # trainer vs rollout log-prob diffs [0, ln 3, ln 0.5] -> ratios [1, 3, 0.5]; cap 2 -> weights [1, 2, 0.5]
    train = torch.log(torch.tensor([[1.0, 3.0, 0.5, 9.0]]))
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # 4th token is padding: weight 0, ignored in metrics
    weights, metrics = truncated_is_weights(train, torch.zeros(1, 4), mask, cap=2.0)
    torch.testing.assert_close(weights, torch.tensor([[1.0, 2.0, 0.5, 0.0]]))
    assert not weights.requires_grad
    assert float(metrics["tis/weight_mean"]) == pytest.approx(3.5 / 3)
    assert float(metrics["tis/ratio_mean"]) == pytest.approx(4.5 / 3)
    assert float(metrics["tis/ratio_max"]) == pytest.approx(3.0)
    assert float(metrics["tis/frac_capped"]) == pytest.approx(1 / 3)
    assert float(metrics["tis/logp_diff_abs_mean"]) == pytest.approx((math.log(3) + math.log(2)) / 3, rel=1e-6)
    assert float(metrics["tis/logp_diff_abs_max"]) == pytest.approx(math.log(3), rel=1e-6)

    # in the loss: ratio 1, A = 1 -> pg = -1 per token, times w -> token mean -(1 + 2 + 0.5) / 3; grad -w / 3
    lp = torch.zeros(1, 4, requires_grad=True)
    loss, _ = policy_loss(lp, torch.zeros(1, 4), torch.ones(1), mask, loss_agg="token_mean", is_weights=weights)
    assert loss.item() == pytest.approx(-3.5 / 3)
    (grad,) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(grad, torch.tensor([[-1 / 3, -2 / 3, -0.5 / 3, 0.0]]))
    with pytest.raises(ValueError, match="algorithm.tis_cap=0"):
        truncated_is_weights(train, torch.zeros(1, 4), mask, cap=0)


# ------------------------------------------------------------------------------------------------- entropy
def test_entropy_bonus_and_metric():
    # pg = 0 (A = 0); entropy [[1, 3]] with coef 0.01 -> loss = -0.01 * mean = -0.02; d loss / d H = -0.01 / 2
    entropy = torch.tensor([[1.0, 3.0]], requires_grad=True)
    lp = torch.zeros(1, 2)
    loss, metrics = policy_loss(lp, lp, torch.zeros(1), torch.ones(1, 2), loss_agg="token_mean", entropy=entropy,
                                entropy_coef=0.01)
    assert loss.item() == pytest.approx(-0.02)
    assert float(metrics["entropy"]) == pytest.approx(2.0)
    (grad,) = torch.autograd.grad(loss, entropy)
    torch.testing.assert_close(grad, torch.tensor([[-0.005, -0.005]]))


# ------------------------------------------------------------------------------------------ masks and errors
def test_garbage_under_the_mask_never_leaks():
    # -inf / nan log-probs at padding (what a padded forward can give) leave loss and gradients finite.
    lp = torch.tensor([[0.1, float("-inf")], [0.2, float("nan")]], requires_grad=True)
    old = torch.tensor([[0.0, float("nan")], [0.0, 0.0]])
    mask = torch.tensor([[True, False], [True, False]])
    for level in ("token", "sequence"):
        loss, metrics = policy_loss(lp, old, torch.tensor([1.0, -1.0]), mask, ratio_level=level,
                                    ref_logprobs=torch.full((2, 2), float("nan")).masked_fill(mask, 0.0), beta=0.1)
        (grad,) = torch.autograd.grad(loss, lp)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert grad[:, 1].tolist() == [0.0, 0.0]
        assert all(torch.isfinite(v) for v in metrics.values())


def test_fully_masked_sequence_does_not_count_in_seq_means():
    # seq1 has no trained token (e.g. truncated + mask_truncated): seq_mean over 1 sequence, not 2.
    lp = torch.zeros(2, 2)
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    loss, _ = policy_loss(lp, lp, torch.tensor([1.0, 1.0]), mask, loss_agg="seq_mean_token_mean")
    assert loss.item() == pytest.approx(-1.0)  # (-1 - 1) / 2 tokens, / 1 sequence
    assert int(loss_normalizer(mask, "seq_mean_token_mean")) == 1
    assert int(loss_normalizer(mask, "token_mean")) == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(loss_agg="mean"), "algorithm.loss_agg='mean' is not one of token_mean, seq_mean_token_mean, "
                                "seq_mean_token_sum_norm"),
        (dict(ratio_level="seq"), "algorithm.ratio_level='seq' is not one of token, sequence"),
        (dict(dual_clip_c=1.0), "algorithm.dual_clip_c=1.0 must be > 1"),
        (dict(clip_eps_low=1.0), "algorithm.clip_eps_low=1.0 must be in [0, 1)"),
        (dict(loss_agg="seq_mean_token_sum_norm"), "needs a positive constant length"),
    ],
)
def test_bad_settings_raise_with_the_key(kwargs, message):
    lp, old, adv, mask = _inputs()
    with pytest.raises(ValueError) as err:
        policy_loss(lp, old, adv, mask, **kwargs)
    assert message in str(err.value)


def test_shape_errors():
    lp, old, adv, mask = _inputs()
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(lp, old, torch.zeros(3), mask)
    with pytest.raises(ValueError, match="old_logprobs must have the shape"):
        policy_loss(lp, old[:, :2], adv, mask)


def test_per_token_advantages():
    # A [B, T] equal along T gives the same loss as A [B]
    lp, old, adv, mask = _inputs()
    a, _ = policy_loss(lp, old, adv, mask, loss_agg="token_mean")
    b, _ = policy_loss(lp, old, adv[:, None].expand(2, 3), mask, loss_agg="token_mean")
    assert a.item() == pytest.approx(b.item())


# --------------------------------------------------------------------------------- micro-batch additivity
def _random_batch(seed=0, b=8, t=6):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([6, 1, 4, 0, 3, 6, 2, 5])  # one empty sequence, uneven lengths across micro-batches
    mask = (torch.arange(t)[None, :] < lengths[:, None]).float()
    old = -torch.rand(b, t, generator=g) * 3
    lp = old + 0.3 * torch.randn(b, t, generator=g)
    ref = old + 0.2 * torch.randn(b, t, generator=g)
    isw = 0.5 + torch.rand(b, t, generator=g)
    adv = torch.randn(b, generator=g)
    return lp, old, adv, mask, ref, isw


@pytest.mark.parametrize("loss_agg", list(LOSS_AGGREGATIONS))
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_micro_batches_with_global_normalizer_equal_full_batch(loss_agg, ratio_level):
    lp, old, adv, mask, ref, isw = _random_batch()
    kw = dict(ratio_level=ratio_level, clip_eps_low=0.2, clip_eps_high=0.28, dual_clip_c=3.0, loss_agg=loss_agg,
              max_tokens=6, beta=0.05, kl_estimator="k3")

    full_lp = lp.clone().requires_grad_()
    full, _ = policy_loss(full_lp, old, adv, mask, ref_logprobs=ref, is_weights=isw, **kw)
    full.backward()

    micro_lp = lp.clone().requires_grad_()
    chunks = [slice(i, i + 2) for i in range(0, 8, 2)]
    normalizer = sum(loss_normalizer(mask[s], loss_agg) for s in chunks)
    assert int(normalizer) == (27 if loss_agg == "token_mean" else 7)  # 6+1+4+0+3+6+2+5 tokens; 7 non-empty seqs
    total = 0.0
    for s in chunks:
        part, _ = policy_loss(micro_lp[s], old[s], adv[s], mask[s], ref_logprobs=ref[s], is_weights=isw[s],
                              normalizer=normalizer, **kw)
        part.backward()
        total += part.item()
    assert total == pytest.approx(full.item(), abs=1e-6)
    torch.testing.assert_close(micro_lp.grad, full_lp.grad, atol=1e-7, rtol=1e-5)
    assert full_lp.grad.abs().sum() > 0


def test_per_micro_batch_means_are_not_the_full_batch_mean():
    # The bug the global normaliser prevents: averaging micro-batch token means over-weights short micro-batches.
    lp, old, adv, mask, _, _ = _random_batch()
    full, _ = policy_loss(lp, old, adv, mask, loss_agg="token_mean")
    naive = sum(float(policy_loss(lp[i:i + 2], old[i:i + 2], adv[i:i + 2], mask[i:i + 2], loss_agg="token_mean")[0])
                for i in range(0, 8, 2)) / 4
    assert abs(naive - full.item()) > 1e-3
