"""The submitit path: two tasks of one submitit job become two torch.distributed ranks."""

from __future__ import annotations

import os

import pytest

from stagewise.training.distributed_env import setup_distributed_env


def test_noop_outside_submitit(monkeypatch):
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    before = dict(os.environ)
    assert setup_distributed_env() is None
    assert dict(os.environ) == before


@pytest.mark.slow
def test_two_submitit_tasks_form_one_process_group(tmp_path):
    import submitit

    def task(num_processes):
        import os

        import torch
        import torch.distributed as dist
        from omegaconf import OmegaConf

        from stagewise.training.distributed_env import setup_distributed_env

        exported = setup_distributed_env(OmegaConf.create({"hardware": {"num_processes": num_processes}}))
        dist.init_process_group("gloo")
        t = torch.tensor([dist.get_rank() + 1.0])
        dist.all_reduce(t)
        dist.destroy_process_group()
        return exported, float(t), os.environ.get("CUDA_VISIBLE_DEVICES")

    executor = submitit.AutoExecutor(folder=str(tmp_path / "submitit"), cluster="local")
    executor.update_parameters(tasks_per_node=2, nodes=1, timeout_min=5)
    job = executor.submit(task, 2)
    results = job.results()
    assert [r[0]["RANK"] for r in results] == ["0", "1"]
    assert [r[0]["LOCAL_RANK"] for r in results] == ["0", "1"]
    assert {r[0]["WORLD_SIZE"] for r in results} == {"2"} and {r[0]["LOCAL_WORLD_SIZE"] for r in results} == {"2"}
    assert len({(r[0]["MASTER_ADDR"], r[0]["MASTER_PORT"]) for r in results}) == 1
    assert [r[1] for r in results] == [3.0, 3.0]  # 1 + 2, summed over the two ranks

    bad = executor.submit(task, 4)
    with pytest.raises(submitit.core.utils.FailedJobError, match="hardware.num_processes=4"):
        bad.results()
