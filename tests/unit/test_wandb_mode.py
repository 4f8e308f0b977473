"""W&B's own environment decides its mode unless the config says otherwise: ``WANDB_MODE=offline python train.py
logger=wandb`` with no API key runs offline (the config's old default ``online`` overrode the variable and crashed
with "No API key configured" after the model and data had loaded)."""

from __future__ import annotations

import pytest

from stagewise.config import LoggerConfig, TrainConfig
from stagewise.tracking.tracker import Tracker


@pytest.mark.parametrize("env_mode, config_mode, expected", [("offline", None, "offline"),
                                                              ("online", "disabled", "disabled")])
def test_wandb_mode_comes_from_wandb_env_unless_the_config_sets_it(tmp_path, monkeypatch, env_mode, config_mode,
                                                                   expected):
    monkeypatch.setenv("WANDB_MODE", env_mode)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = TrainConfig(logger=LoggerConfig(sinks=["wandb"], wandb_mode=config_mode), run_id="r", task_name="t")
    with Tracker(cfg, tmp_path, stage="grpo") as tracker:
        assert tracker._wandb.settings.mode == expected
        tracker.log({"loss": 1.0}, step=1)
    if expected == "offline":
        assert list((tmp_path / "wandb").glob("offline-run-*"))  # the run went to disk, not to the network
