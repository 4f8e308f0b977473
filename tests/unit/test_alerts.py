"""Trend alerts and the NaN guard on synthetic metric series, with the expected firings worked out by hand."""

from __future__ import annotations

import json
import logging
import math

import pytest

from stagewise.tracking import Tracker, read_metrics
from stagewise.tracking.alerts import (
    AlertThresholds,
    NanGuard,
    NonFiniteLossError,
    TrendAlerts,
    as_float,
    falling_streak,
    is_spike,
    nan_guard_decision,
)

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("values, expected", [
    ([], 0), ([1.0], 0), ([1.0, 2.0], 0), ([2.0, 1.0], 1), ([1.0, 3.0, 2.0, 1.0], 2),
    ([3.0, 2.0, 2.0, 1.0], 1),  # a flat step breaks the streak
    ([5.0, 4.0, 3.0, 2.0, 1.0], 4),
])
def test_falling_streak(values, expected):
    assert falling_streak(values) == expected


@pytest.mark.parametrize("history, value, expected", [
    ([1.0, 1.0, 1.0, 1.0, 1.0], 10.5, True),   # 10.5 > 10 x median 1
    ([1.0, 1.0, 1.0, 1.0, 1.0], 10.0, False),  # not strictly above
    ([1.0, 1.0, 1.0, 1.0], 50.0, False),       # only 4 earlier values (< min_history 5)
    ([0.0, 0.0, 0.0, 0.0, 0.0], 3.0, False),   # a zero median has no scale
    ([1.0, 2.0, 3.0, 100.0, 100.0], 31.0, True),  # median 3 -> threshold 30
])
def test_is_spike(history, value, expected):
    assert is_spike(history, value, factor=10.0, min_history=5) is expected


@pytest.mark.parametrize("value, expected", [
    (1, 1.0), (2.5, 2.5), ("nan", NAN), ("inf", INF), ("-inf", -INF), ("sft", None), (None, None), (True, None),
])
def test_as_float(value, expected):
    got = as_float(value)
    if expected is None:
        assert got is None
    elif math.isnan(expected):
        assert math.isnan(got)
    else:
        assert got == expected


# A 12-log GRPO-like series. Thresholds: defaults (5 falling logs, entropy < 0.1 x first, kl_max 1, spikes 10 x
# median of >= 5 earlier logs).
SERIES = {
    "loss":               [0.5, 0.4, 0.45, 0.3, 0.35, 0.3, 0.2, 0.25, 0.2, 0.22, 0.2, NAN],
    "reward/total/mean":  [0.1, 0.2, 0.3, 0.4, 0.5, 0.45, 0.40, 0.35, 0.30, 0.25, 0.20, 0.3],
    "reward/format/mean": [1.0] * 12,
    "entropy":            [2.0, 1.5, 1.0, 0.5, 0.3, 0.21, 0.19, 0.1, 0.3, 0.5, 0.5, 0.5],
    "kl":                 [0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.2, 0.02, 1.5, NAN, 0.01, 0.01],
    "grad_norm":          [1.0, 1.2, 0.8, 1.1, 0.9, 50.0, 1.0, 1.0, 1.0, 1.0, INF, 1.0],
}
# By hand:
#   reward/total falls at logs 5..10: streaks 1,2,3,4,5,6 -> fires at 9 and 10 (the deque keeps 6 values, so the
#     streak seen at 10 is 5); rises at 11.
#   entropy first value 2.0 -> collapse below 0.2: logs 6 (0.19) and 7 (0.1).
#   kl: log 6 = 0.2 > 10 x median(0.01 x 6) = 0.1; log 8 = 1.5 > kl_max; log 9 is nan.
#   grad_norm: log 5 = 50 > 10 x median(1.0, 1.2, 0.8, 1.1, 0.9) = 10; log 10 is inf.
#   loss: nan at log 11.
EXPECTED = {
    5: {"alert/grad_norm_spike"},
    6: {"alert/entropy_collapse", "alert/kl_blowup"},
    7: {"alert/entropy_collapse"},
    8: {"alert/kl_blowup"},
    9: {"alert/reward_falling/total", "alert/kl_blowup"},
    10: {"alert/reward_falling/total", "alert/grad_norm_spike"},
    11: {"alert/nonfinite_loss"},
}


def records():
    n = len(SERIES["loss"])
    return [{"step": i, **{k: v[i] for k, v in SERIES.items()}} for i in range(n)]


def test_alerts_fire_on_synthetic_series(caplog):
    alerts = TrendAlerts()
    fired = {}
    with caplog.at_level(logging.WARNING, logger="stagewise.alerts"):
        for rec in records():
            out = alerts.check(rec, step=rec["step"])
            assert all(v == 1.0 for v in out.values())
            if out:
                fired[rec["step"]] = set(out)
    assert fired == EXPECTED
    text = caplog.text
    assert "ALERT reward_falling/total at step 9: reward/total/mean fell on each of the last 5 logs" in text
    assert "ALERT kl_blowup at step 8: kl=1.5 > kl_max=1" in text
    assert "ALERT grad_norm_spike at step 5: grad_norm=50 > 10 x median 1 of the last 5 logs" in text
    assert "ALERT nonfinite_loss at step 11: loss is nan" in text
    assert "ALERT entropy_collapse at step 6: entropy=0.19 is below 0.1 x its first value 2" in text


def test_thresholds_change_what_fires():
    alerts = TrendAlerts(reward_falling_logs=3, entropy_collapse_fraction=0.2)
    fired = {r["step"]: set(alerts.check(r, step=r["step"])) for r in records()}
    # reward streaks 3,4,5,6 at logs 7..10 (a 4-value window caps the visible streak at 3)
    assert all("alert/reward_falling/total" in fired[s] for s in (7, 8, 9, 10))
    assert "alert/reward_falling/total" not in fired[6]
    # entropy below 0.4 (0.2 x 2.0): logs 4..9 (0.3, 0.21, 0.19, 0.1, 0.3) and not 9 (0.5)
    assert [s for s in range(12) if "alert/entropy_collapse" in fired[s]] == [4, 5, 6, 7, 8]


def test_alert_state_round_trips_through_json():
    """A resumed run (alert state from the checkpoint) fires exactly as the uninterrupted one."""
    recs = records()
    straight = TrendAlerts()
    expected = [straight.check(r, step=r["step"]) for r in recs]
    first = TrendAlerts()
    got = [first.check(r, step=r["step"]) for r in recs[:7]]
    resumed = TrendAlerts()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    got += [resumed.check(r, step=r["step"]) for r in recs[7:]]
    assert got == expected


def test_alerts_reach_metrics_jsonl(tmp_path):
    """Merged into the record and written by the real Tracker; a NaN loss is stored as the string "nan"."""
    from stagewise.config import LoggerConfig, TrainConfig

    cfg = TrainConfig(logger=LoggerConfig(sinks=["jsonl"]))
    alerts = TrendAlerts()
    with Tracker(cfg, tmp_path, stage="grpo") as tracker:
        for rec in records():
            metrics = {k: v for k, v in rec.items() if k != "step"}
            metrics.update(alerts.check(metrics, step=rec["step"]))
            tracker.log(metrics, step=rec["step"])
    rows = read_metrics(tmp_path / "metrics.jsonl")
    by_step = {r["step"]: {k for k in r if k.startswith("alert/")} for r in rows}
    assert {s: a for s, a in by_step.items() if a} == EXPECTED
    assert rows[11]["loss"] == "nan" and rows[11]["alert/nonfinite_loss"] == 1.0


def test_alert_thresholds_are_checked():
    with pytest.raises(ValueError, match="must be >= 1"):
        AlertThresholds(reward_falling_logs=0)


# ----------------------------------------------------------------------------------------------- NaN guard
@pytest.mark.parametrize("max_consecutive, losses, actions, consecutive", [
    (3, [1.0, NAN, NAN, 2.0, INF, NAN, "nan"],
     ["update", "skip", "skip", "update", "skip", "skip", "stop"], [0, 1, 2, 0, 1, 2, 3]),
    (1, [0.5, NAN], ["update", "stop"], [0, 1]),
    (2, [-INF, 0.1, NAN, 0.2], ["skip", "update", "skip", "update"], [1, 0, 1, 0]),
])
def test_nan_guard_table(max_consecutive, losses, actions, consecutive):
    guard = NanGuard(max_consecutive)
    got_actions, got_consecutive = [], []
    for loss in losses:
        got_actions.append(guard.observe(loss))
        got_consecutive.append(guard.consecutive)
    assert got_actions == actions
    assert got_consecutive == consecutive
    assert guard.skipped_total == sum(a != "update" for a in actions)
    assert guard.metrics() == {"nan_guard/skipped_total": float(guard.skipped_total)}


def test_nan_guard_resume_and_error():
    guard = NanGuard(3)
    guard.observe(NAN)
    guard.observe(NAN)
    resumed = NanGuard(3)
    resumed.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    assert resumed.observe(NAN) == "stop"  # the third in a row, counted across the resume
    err = resumed.error(step=42, run_dir="/runs/x")
    assert isinstance(err, NonFiniteLossError)
    assert "3 non-finite losses in a row" in str(err) and "step 42" in str(err) and "/runs/x/checkpoints" in str(err)
    assert nan_guard_decision(0.0, 7, 3) == ("update", 0)
    with pytest.raises(ValueError, match="max_consecutive must be >= 1"):
        NanGuard(0)


def test_logger_alerts_thresholds_are_settable_from_the_config():
    """`logger.alerts.*` is a typed block (stagewise.config.AlertsConfig) that the Tracker's alerts read."""
    import dataclasses

    from conftest import compose
    from stagewise.config import AlertsConfig
    from stagewise.hydra_config import typed_config

    assert dataclasses.asdict(AlertsConfig()) == dataclasses.asdict(AlertThresholds())  # one set of defaults
    cfg = typed_config(compose(["stage=grpo", "logger.alerts.reward_falling_logs=2", "logger.alerts.kl_max=0.5"]))
    alerts = TrendAlerts.from_config(cfg.logger.alerts)
    assert alerts.t.reward_falling_logs == 2 and alerts.t.kl_max == 0.5 and alerts.t.window == 20
    fired = {}
    for step, r in enumerate([1.0, 0.9, 0.8]):  # two decreases in a row: fires at the third log with the setting 2
        fired = alerts.check({"reward/total/mean": r}, step)
    assert "alert/reward_falling/total" in fired
    with pytest.raises(Exception, match="logger.alerts.kl_mx"):
        compose(["logger.alerts.kl_mx=0.5"])
