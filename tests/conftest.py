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

    from stagewise.config import register_configs
    from stagewise.hydra_config import validate_config
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


def train_py_in_process(args: list[str], cwd: Path, monkeypatch, capsys) -> subprocess.CompletedProcess:
    """``python train.py <args>`` run as ``__main__`` in this process, for the paths that print and exit before any
    stage runs (``--cfg job``, ``--help``, a config error): the same code as the subprocess without an interpreter
    start and its imports. Hydra's global state and the environment train.py sets are restored afterwards."""
    import runpy

    from hydra.core.global_hydra import GlobalHydra

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [str(REPO / "train.py"), *args])
    monkeypatch.setenv("PROJECT_ROOT", str(cwd))
    monkeypatch.delenv("STAGEWISE_RUN_ID", raising=False)
    environ = dict(os.environ)
    capsys.readouterr()
    code = 0
    try:
        runpy.run_path(str(REPO / "train.py"), run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    finally:
        GlobalHydra.instance().clear()
        os.environ.clear()
        os.environ.update(environ)
    out = capsys.readouterr()
    return subprocess.CompletedProcess(sys.argv, code, out.out, out.err)


def run_stage_in_process(overrides: list[str], run_dir: Path, threads: int | None = None) -> Path:
    """The single stage ``python train.py <overrides>`` would run, run in this process (no interpreter start, no
    imports: seconds instead of half a minute) into ``run_dir``, its tokenised-data cache beside it. For one-process
    runs whose console and run-folder setup other tests cover; the signal handler the stage installs is removed.
    ``threads``: torch's thread count for the run (e.g. 1, to equal a subprocess run with OMP_NUM_THREADS=1)."""
    import importlib

    import torch

    from stagewise.hydra_config import compose as compose_typed
    from stagewise.training.preemption import uninstall_preemption_handler

    cfg = compose_typed(overrides)
    cfg.run_dir, cfg.paths.cache_dir = str(run_dir), str(run_dir.parent / "cache")
    run_dir.mkdir(parents=True, exist_ok=True)  # as Hydra makes the job's folder before train.py's main
    stage = importlib.import_module(f"stagewise.stages.{cfg.stage.name}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        stage.run(cfg)
    finally:
        torch.set_num_threads(before)
        uninstall_preemption_handler()
    return run_dir


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_two_cpu_ranks(worker: Path, *args: str, timeout: int, hang_message: str) -> str:
    """``worker`` on 2 CPU ranks under torchrun (one thread each); returns their combined output. A run past
    ``timeout`` has the launcher and both ranks killed and fails with ``hang_message``; a non-zero exit fails too."""
    import signal

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(free_port()), str(worker), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{hang_message}: {out[-2000:]}")
    assert proc.returncode == 0, out[-4000:]
    return out


def metric_by_step(path: Path, key: str) -> dict:
    """step -> value of ``key`` in a metrics.jsonl (a step logged twice keeps its last value; a torn last line, as
    kill -9 can leave, is skipped; a missing file is empty)."""
    import json

    out = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if key in rec:
            out[rec["step"]] = rec[key]
    return out


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


# The learning runs of the suite, each a whole pipeline in its own process. The suite runs on two pytest-xdist
# workers, one test file each at a time (pyproject.toml), so the two files that use them train side by side. Other
# seeds and reduction orders (OMP_NUM_THREADS=1) are benchmarks/learning.py's job (README tables).
LEARNING_RUNS = {
    "default": ([], {}),  # the README's `python train.py`
    # pipeline=deepanalyze_tiny with RL cut from 20 steps to 10
    "deepanalyze_tiny": (["pipeline=deepanalyze_tiny", 'pipeline.stages.3.overrides=["experiment=deepanalyze_tiny/rl",'
                          '"stage.max_steps=10","stage.samples_steps=5"]'], {}),
}


@pytest.fixture(scope="session")
def learning_run(tmp_path_factory):
    """``learning_run(name)``: the `LEARNING_RUNS` entry run once per session: (completed process, its PROJECT_ROOT)."""
    done: dict = {}

    def run(name: str):
        if name not in done:
            args, env = LEARNING_RUNS[name]
            root = tmp_path_factory.mktemp(name)
            done[name] = (run_train(args, cwd=root, timeout=1800, env=env), root)
        return done[name]

    return run


def pytest_collection_modifyitems(config, items):
    """The learning pipelines are the suite's longest tests (minutes each): first in line, so the two xdist workers
    start them at once instead of finishing the suite on one of them."""
    items.sort(key=lambda item: "learning_run" not in getattr(item, "fixturenames", ()))
