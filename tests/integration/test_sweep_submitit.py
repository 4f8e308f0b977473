"""Sweeps through the submitit launchers.

* A real two-job sweep through submitit's local executor (the SLURM code path without SLURM: pickled jobs,
  JobEnvironment, .submitit/ logs): two run folders in one sweep folder, both complete, each with its own seed.
* The SLURM presets, resolved exactly as on a cluster (the real launcher and submitit's own sbatch writer), with
  and without the cluster settings a gitignored conf/local/default.yaml would provide.
"""

from __future__ import annotations

import json
import re
import shutil
import stat
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import CONF_DIR, REPO, compose, run_train
from stagewise import runs
from stagewise.config import DEEPANALYZE_TAGS


@pytest.mark.slow
def test_two_job_sweep_through_submitit_local(tmp_path):
    proc = run_train(["-m", "hydra/launcher=submitit_local", "stage=vocab", "model.tiny.with_deepanalyze_tags=false",
                      "seed=0,1"], cwd=tmp_path, timeout=600, env={"OMP_NUM_THREADS": "1"})  # 2 jobs, 2 cores
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sweeps = list((tmp_path / "outputs" / "train").iterdir())
    assert len(sweeps) == 1 and sweeps[0].name.startswith("multirun_"), sweeps
    sweep = sweeps[0]
    assert (sweep / "multirun.yaml").exists()
    assert sorted(p.name for p in sweep.iterdir() if not p.name.startswith(".")) == ["0", "1", "multirun.yaml"]

    for job in (0, 1):
        run = sweep / str(job)
        for rel in (".hydra/config.yaml", ".hydra/overrides.yaml", "metrics.jsonl", "train.log", "vocab.json",
                    "final/config.json", "final/model.safetensors", "final/tokenizer.json"):
            assert (run / rel).exists(), f"{run}/{rel}"
        assert OmegaConf.load(run / ".hydra" / "config.yaml").seed == job
        assert yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()) == [
            "stage=vocab", "model.tiny.with_deepanalyze_tags=False", f"seed={job}"]
        (record,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert record["stage"] == "vocab" and record["step"] == 0
        assert record["vocab/added"] == 10 and record["vocab/tokens_after"] == 1038
        added = json.loads((run / "vocab.json").read_text())
        assert [a["token"] for a in added] == DEEPANALYZE_TAGS
        assert [a["id"] for a in added] == list(range(1028, 1038))
        assert f"saved {run}/final" in (run / "train.log").read_text()

    # each job ran as its own submitit job (separate process, JobEnvironment) and reported success
    logs = sorted((sweep / ".submitit").glob("*/*_0_log.out"))
    assert len(logs) == 2
    for log in logs:
        text = log.read_text()
        assert re.search(r"Starting with JobEnvironment\(job_id=\d+", text)
        assert "Job completed successfully" in text
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2

    # stagewise.runs sees one sweep of two complete runs that differ only in their seed
    table = runs.load_sweep(sweep)
    assert table["run"].tolist() == ["0", "1"]
    assert table["complete"].tolist() == [True, True]
    assert table["seed"].tolist() == [0, 1]
    assert [c for c in table.columns if "." in c] == []  # no other config key differs
    assert table["vocab/added"].tolist() == [10, 10]


# -------------------------------------------------------------------------------------------- SLURM presets
def clean_conf(tmp_path: Path) -> Path:
    """conf/ without a developer's gitignored conf/local/default.yaml (tests must not depend on it)."""
    dest = tmp_path / "conf"
    shutil.copytree(CONF_DIR, dest, ignore=lambda d, names: [n for n in names if Path(d).name == "local"
                                                             and n != "example.yaml"])
    return dest


def compose_from(conf_dir: Path, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    compose([])  # registers the schema and resolvers exactly as the tests' compose does
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides, return_hydra_config=True)


def sbatch_text(overrides: list[str], tmp_path: Path, monkeypatch) -> str:
    """The sbatch script submitit would submit for this sweep (rendered by submitit, never submitted)."""
    import submitit
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    monkeypatch.setenv("STAGEWISE_RUN_ID", "sweep-test")
    bin_dir = tmp_path / "bin"  # submitit's SlurmExecutor only checks that `srun` exists; it is never run
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")

    cfg = compose_from(clean_conf(tmp_path), overrides)
    launcher = instantiate(cfg.hydra.launcher)
    # the launcher's own split of its params (BaseSubmititLauncher.launch)
    params = dict(launcher.params)
    executor = submitit.AutoExecutor(cluster="slurm", folder=str(tmp_path / "submitit"),
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    params.pop("submitit_folder")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    return executor._executor._make_submission_file_text("python -u -m submitit.core._submit", "uid")


def flags(text: str) -> dict:
    return dict(m.groups() for m in re.finditer(r"^#SBATCH --([\w-]+)=(.*)$", text, re.M))


def setup_lines(text: str) -> list[str]:
    """The lines submitit puts between "# setup" and "# command"."""
    if "# setup" not in text:
        return []
    return [line for line in text.split("# setup", 1)[1].split("# command", 1)[0].splitlines() if line.strip()]


def test_slurm_preset_takes_cluster_settings(tmp_path, monkeypatch):
    text = sbatch_text(["hydra/launcher=slurm", "hardware=8xa100", "++cluster.partition=gpu", "++cluster.account=lab",
                        "++cluster.timeout_min=720", "++cluster.qos=high", "++cluster.cpus_per_task=12",
                        "++cluster.setup=[module load cuda,source env/bin/activate]"], tmp_path, monkeypatch)
    f = flags(text)
    assert setup_lines(text) == ["module load cuda", "source env/bin/activate"]
    assert f["partition"] == "gpu" and f["account"] == "lab" and f["qos"] == "high"
    assert f["time"] == "720" and f["cpus-per-task"] == "12"
    # one node, one task per GPU of hardware=8xa100
    assert f["nodes"] == "1" and f["gpus-per-node"] == "8" and f["ntasks-per-node"] == "8"
    # submitit's preemption signal 300 s ahead; every job resolves the sweep's run id
    assert f["signal"] == "USR2@300"
    assert f["export"] == "ALL,STAGEWISE_RUN_ID=sweep-test"


def test_slurm_preset_without_local_settings(tmp_path, monkeypatch):
    text = sbatch_text(["hydra/launcher=slurm"], tmp_path, monkeypatch)
    f = flags(text)
    assert "partition" not in f and "account" not in f and "qos" not in f  # the cluster's defaults apply
    assert f["time"] == "240" and f["cpus-per-task"] == "8"
    assert f["gpus-per-node"] == "1" and f["ntasks-per-node"] == "1"  # hardware=cpu: one process
    assert setup_lines(text) == []


def test_slurm_multinode_preset(tmp_path, monkeypatch):
    f = flags(sbatch_text(["hydra/launcher=slurm_multinode", "hardware=8xa100", "hardware.num_machines=2",
                           "hardware.num_processes=8", "++cluster.gpus_per_node=4", "++cluster.partition=big"],
                          tmp_path, monkeypatch))
    assert f["nodes"] == "2" and f["gpus-per-node"] == "4" and f["ntasks-per-node"] == "4"
    assert f["partition"] == "big" and f["export"] == "ALL,STAGEWISE_RUN_ID=sweep-test"


def test_submitit_local_preset_one_task_per_process():
    cfg = compose(["hydra/launcher=submitit_local", "hardware=cpu_2proc"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.LocalLauncher")
    assert launcher.tasks_per_node == 2 and launcher.nodes == 1 and launcher.timeout_min == 60


def test_local_example_sets_exactly_the_keys_the_presets_read():
    """A key misspelt in conf/local/example.yaml would be silently ignored by the presets: keep them in sync."""
    read = set()
    for preset in ("slurm.yaml", "slurm_multinode.yaml"):
        read |= set(re.findall(r"cluster\.(\w+)", (CONF_DIR / "hydra" / "launcher" / preset).read_text()))
    example = OmegaConf.load(CONF_DIR / "local" / "example.yaml")
    assert set(example.cluster.keys()) == read
    assert (REPO / ".gitignore").read_text().count("conf/local/*.yaml") == 1
