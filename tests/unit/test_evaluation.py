"""stagewise.evaluation: the unbiased pass@k, the acceptance score, the summary of hand-built results, the spec."""

from __future__ import annotations

import math

import pytest

from stagewise.hydra_config import typed_config
from stagewise.evaluation import (
    EvalSpec,
    PromptResult,
    acceptance_scores,
    is_correct,
    pass_at_k,
    rank_share,
    summarise,
)

from conftest import compose


@pytest.mark.parametrize("n,c,k,expected", [
    (5, 2, 1, 0.4),                       # c / n
    (5, 2, 2, 1 - 3 / 10),                # 1 - C(3,2)/C(5,2)
    (5, 2, 3, 1 - 1 / 10),                # 1 - C(3,3)/C(5,3)
    (5, 2, 4, 1.0),                       # fewer than k wrong samples: every k-subset has a correct one
    (10, 3, 5, 1 - 21 / 252),             # 1 - C(7,5)/C(10,5)
    (4, 0, 2, 0.0),
    (4, 4, 1, 1.0),
    (16, 1, 8, 0.5),                      # 1 - C(15,8)/C(16,8) = 1 - 8/16
])
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_large_n_is_stable_and_matches_comb():
    n, c, k = 200, 37, 10
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("n,c,k", [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_acceptance_score_is_the_weighted_mean_with_none_as_zero():
    per_fn = {"acc": [1.0, 0.0, None, 1.0], "fmt": [1.0, 1.0, 1.0, 0.5]}
    weights = {"acc": 3.0, "fmt": 1.0}
    assert acceptance_scores(per_fn, weights) == pytest.approx([1.0, 0.25, 0.25, 0.875])
    assert acceptance_scores(per_fn, weights, score_reward="acc") == [1.0, 0.0, None, 1.0]


def test_acceptance_score_errors_name_the_key():
    with pytest.raises(KeyError, match="stage.score_reward"):
        acceptance_scores({"acc": [1.0]}, {"acc": 1.0}, score_reward="accuracy")
    with pytest.raises(ValueError, match="weights sum"):
        acceptance_scores({"a": [1.0], "b": [0.0]}, {"a": 1.0, "b": -1.0})


def test_is_correct_boundary():
    assert is_correct(0.8, 0.8) and is_correct(1.0, 0.8)
    assert not is_correct(0.7999, 0.8)
    assert not is_correct(None, 0.0) and not is_correct(float("nan"), 0.0)


def _result(row, scores, source="a", totals=None, fn=None):
    n = len(scores)
    return PromptResult(row=row, source=source, totals=totals or [s or 0.0 for s in scores], scores=scores,
                        per_fn={"r": fn or list(scores)}, lengths=[10] * n, truncated=[False] * (n - 1) + [True],
                        format_ok=[True] * n)


def test_summarise_hand_built_results():
    spec = EvalSpec(pass_k=(1, 2, 4), num_samples=4, threshold=0.8)
    results = [_result(0, [1.0, 0.0, 0.9, 0.1], source="a", fn=[1.0, None, 0.9, 0.1]),
               _result(1, [0.0, 0.0, 0.0, 0.8], source="b", totals=[0.5, 0.5, 0.5, 2.5])]
    m = summarise(results, spec)
    assert m["eval/accuracy"] == pytest.approx(3 / 8)
    assert m["eval/pass@1"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    # prompt 0: 2 of 4 correct -> 1 - C(2,2)/C(4,2) = 5/6; prompt 1: 1 of 4 -> 1 - C(3,2)/C(4,2) = 1/2
    assert m["eval/pass@2"] == pytest.approx((5 / 6 + 1 / 2) / 2)
    assert m["eval/pass@4"] == pytest.approx(1.0)
    assert m["eval/reward/total/mean"] == pytest.approx((1.0 + 0.0 + 0.9 + 0.1 + 0.5 * 3 + 2.5) / 8)
    assert m["eval/reward/r/mean"] == pytest.approx((1.0 + 0.9 + 0.1 + 0 + 0 + 0 + 0.8) / 7)  # None left out
    assert m["eval/a/accuracy"] == pytest.approx(0.5) and m["eval/b/accuracy"] == pytest.approx(0.25)
    assert m["eval/completions/clipped_ratio"] == pytest.approx(0.25)
    assert m["eval/num_prompts"] == 2 and m["eval/samples_per_prompt"] == 4
    assert summarise([], spec) == {}


def test_rank_share_pads_every_rank_to_the_same_length():
    assert rank_share(5, 0, 2) == ([0, 2, 4], 3)
    assert rank_share(5, 1, 2) == ([1, 3, 1], 2)
    assert rank_share(1, 1, 2) == ([0], 0)
    assert rank_share(4, 0, 1) == ([0, 1, 2, 3], 4)


def spec_of(overrides):
    cfg = typed_config(compose(overrides))
    return EvalSpec.from_config(cfg.stage, cfg.rollout)


def test_eval_spec_from_config():
    greedy = spec_of(["stage=eval"])
    assert (greedy.pass_k, greedy.num_samples, greedy.temperature, greedy.threshold) == ((1,), 1, 0.0, 0.8)
    sampled = spec_of(["stage=eval", "stage.pass_k=[4,1]", "rollout.temperature=0.6"])
    assert (sampled.pass_k, sampled.num_samples, sampled.temperature) == ((1, 4), 4, 0.6)
    assert spec_of(["stage=eval", "stage.pass_k=[1,4]", "stage.eval_num_samples=16"]).num_samples == 16
    with pytest.raises(ValueError, match="stage.eval_num_samples"):
        spec_of(["stage=eval", "stage.pass_k=[4]", "stage.eval_num_samples=2"])
    with pytest.raises(ValueError, match="rollout.temperature"):
        spec_of(["stage=eval", "stage.pass_k=[1,4]", "rollout.temperature=0"])
    with pytest.raises(ValueError, match="stage.pass_k"):
        spec_of(["stage=eval", "stage.pass_k=[0]"])
