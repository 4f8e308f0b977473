"""Early stopping: the pure decision rule and its checkpointed state."""

from __future__ import annotations

import math

import pytest
from omegaconf import OmegaConf

from stagewise.training.early_stopping import EarlyStopping, StopState, decide, resolve_mode


def run_rule(values, mode="max", patience=2, min_delta=0.0, start=0):
    state, trace = StopState(), []
    for i, v in enumerate(values):
        state, improved = decide(state, v, start + i, mode=mode, patience=patience, min_delta=min_delta)
        trace.append((improved, state.bad_evals, state.stopped))
        if state.stopped:
            break
    return state, trace


def test_max_mode_stops_after_patience_evals_without_improvement():
    state, trace = run_rule([0.5, 0.6, 0.6, 0.55, 0.7], mode="max", patience=2)
    # 0.6 equal to the best is not an improvement; 0.7 is never seen because the run stopped at step 3
    assert trace == [(True, 0, False), (True, 0, False), (False, 1, False), (False, 2, True)]
    assert (state.best, state.best_step, state.last_step) == (0.6, 1, 3)


def test_min_mode_with_min_delta():
    state, trace = run_rule([1.0, 0.95, 0.85, 0.84], mode="min", patience=3, min_delta=0.1)
    assert [t[0] for t in trace] == [True, False, True, False]  # 0.95 is not 0.1 below 1.0; 0.85 is
    assert (state.best, state.best_step, state.bad_evals, state.stopped) == (0.85, 2, 1, False)


def test_a_bad_eval_resets_only_on_improvement():
    _, trace = run_rule([1.0, 2.0, 0.5, 3.0, 2.9, 2.8], mode="max", patience=2)
    assert [t[1] for t in trace] == [0, 0, 1, 0, 1, 2] and trace[-1][2]


def test_nan_never_improves_and_patience_zero_never_stops():
    state, trace = run_rule([math.nan, 0.3, math.nan], mode="max", patience=0)
    assert [t[0] for t in trace] == [False, True, False]
    assert (state.best, state.best_step, state.bad_evals, state.stopped) == (0.3, 1, 1, False)
    state, _ = run_rule([1.0] + [0.0] * 50, mode="max", patience=0)
    assert not state.stopped and state.bad_evals == 50


def test_the_same_step_twice_changes_nothing():
    state, _ = decide(StopState(), 0.5, 10, mode="max", patience=1)
    again, improved = decide(state, 0.1, 10, mode="max", patience=1)
    assert again == state and not improved


def test_resolve_mode():
    assert resolve_mode("eval/loss", "auto") == "min"
    assert resolve_mode("eval/accuracy", "auto") == "max"
    assert resolve_mode("eval/loss", "max") == "max"
    with pytest.raises(ValueError, match="stage.early_stopping_mode"):
        resolve_mode("eval/loss", "down")


def _stage(**kw):
    base = {"early_stopping_metric": "eval/accuracy", "early_stopping_mode": "auto", "early_stopping_patience": 2,
            "early_stopping_min_delta": 0.0, "eval_steps": 5}
    return OmegaConf.create({**base, **kw})


def test_from_config_checks_the_metric_can_be_produced():
    assert EarlyStopping.from_config(_stage(early_stopping_metric=None), {}, has_loss=True,
                                     has_generative=True) is None
    with pytest.raises(ValueError, match="stage.eval_steps"):
        EarlyStopping.from_config(_stage(eval_steps=0), {}, has_loss=True, has_generative=True)
    with pytest.raises(ValueError, match="eval loss"):
        EarlyStopping.from_config(_stage(early_stopping_metric="eval/loss"), {}, has_loss=False, has_generative=True)
    with pytest.raises(ValueError, match="reward="):
        EarlyStopping.from_config(_stage(), {}, has_loss=True, has_generative=False)


def test_state_lives_in_extra_and_resumes():
    extra = {}
    es = EarlyStopping.from_config(_stage(), extra, has_loss=False, has_generative=True)
    assert es.observe({"eval/accuracy": 0.2}, 5) is True
    assert es.observe({"eval/accuracy": 0.1}, 10) is False
    assert extra["early_stopping"] == {"best": 0.2, "best_step": 5, "bad_evals": 1, "last_step": 10,
                                       "stopped": False}
    # a resumed run rebuilds the stopper from the checkpointed extra and decides as the uninterrupted one would
    resumed = EarlyStopping.from_config(_stage(), dict(extra), has_loss=False, has_generative=True)
    assert resumed.observe({"eval/accuracy": 0.15}, 15) is False and resumed.stopped
    with pytest.raises(KeyError, match="stage.early_stopping_metric"):
        es.observe({"eval/loss": 1.0}, 20)
