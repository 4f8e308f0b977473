"""Shared fixtures. Tests never download anything: they use the offline tiny model and fixture data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def compose(overrides: list[str] | None = None, return_hydra_config: bool = False):
    """Compose conf/train.yaml exactly as train.py does."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from stagewise.config import register_configs, validate_config
    from stagewise.run_folder import register_resolvers

    register_resolvers()
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=overrides or [], return_hydra_config=return_hydra_config)
    if not return_hydra_config:
        validate_config(cfg)
    return cfg


def run_train(args: list[str], cwd: Path, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python train.py <args>` in a subprocess with outputs under `cwd`."""
    full_env = {**os.environ, "PROJECT_ROOT": str(cwd), **(env or {})}
    full_env.pop("STAGEWISE_RUN_ID", None)
    full_env.pop("LOCAL_RANK", None)
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def only_run_dir(root: Path, task: str = "train") -> Path:
    runs = [p for p in (root / "outputs" / task).iterdir() if p.is_dir()]
    assert len(runs) == 1, f"expected one run folder under {root}/outputs/{task}, found {runs}"
    return runs[0]


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the default tiny model; do not mutate (use `fresh_tiny` for that)."""
    from stagewise.config import ModelConfig
    from stagewise.models import load_model_and_tokenizer

    return load_model_and_tokenizer(ModelConfig())
