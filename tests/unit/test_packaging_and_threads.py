"""Issue 16 points 10 and 9: ``.[dev]`` installs what the notebook's documented command needs, train.py leaves
datasets' progress bars off, and CPU runs get passive OpenMP waiting (unless the user chose a policy)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

from conftest import REPO
from stagewise.launch import set_cpu_thread_policy


def test_dev_extra_has_what_the_notebook_command_needs():
    dev = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    names = {re.split(r"[<>=\[ ;]", d, maxsplit=1)[0].lower() for d in dev}
    notebook = (REPO / "notebooks" / "inspect_run.ipynb").read_text()
    assert "jupyter nbconvert" in notebook
    assert {"nbconvert", "nbclient", "ipykernel"} <= names


def test_cpu_thread_policy(monkeypatch):
    monkeypatch.setattr("stagewise.launch.on_gpu_machine", lambda: False)
    env = {}
    assert set_cpu_thread_policy(env) == "PASSIVE" and env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert set_cpu_thread_policy(env) is None and env == {"OMP_WAIT_POLICY": "ACTIVE"}  # the user's choice stays
    monkeypatch.setattr("stagewise.launch.on_gpu_machine", lambda: True)
    env = {}
    assert set_cpu_thread_policy(env) is None and env == {}


def test_train_py_sets_the_policy_before_torch_and_quiets_datasets_bars():
    code = ("import os, sys, runpy; os.environ.pop('OMP_WAIT_POLICY', None); sys.argv = ['train.py'];"
            "import importlib.util as u; s = u.spec_from_file_location('t', 'train.py'); m = u.module_from_spec(s);"
            "s.loader.exec_module(m); print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    import os
    if not (os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")):
        assert out.stdout.split() == ["PASSIVE", "False"]  # set, and torch not imported yet
    from stagewise.tracking.logs import quiet_library_progress_bars
    env_before = os.environ.pop("HF_DATASETS_DISABLE_PROGRESS_BARS", None)
    try:
        quiet_library_progress_bars()
        assert os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1"
        from huggingface_hub.utils import are_progress_bars_disabled
        from transformers.utils import logging as transformers_logging

        assert not transformers_logging.is_progress_bar_enabled()  # "Writing model shards"
        assert not are_progress_bars_disabled() or "HF_HUB_DISABLE_PROGRESS_BARS" in os.environ  # downloads keep theirs
    finally:
        os.environ.pop("HF_DATASETS_DISABLE_PROGRESS_BARS", None)
        if env_before is not None:
            os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = env_before
