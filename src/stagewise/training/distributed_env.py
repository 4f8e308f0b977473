"""torch.distributed environment for jobs started by submitit (``python train.py -m hydra/launcher=slurm ...``).

On the submitit path there is no torchrun: SLURM (or submitit's local executor) starts ``tasks_per_node`` copies
of the job on each node, one per GPU, and each copy runs ``train.py``'s main. Before the Accelerator is built,
each task must look like a torchrun worker: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``. ``setup_distributed_env`` exports them from submitit's ``JobEnvironment`` through
``submitit.helpers.TorchDistributedEnvironment`` (first node's hostname, a port derived from the job id), which is
also what keeps ``train.py`` from relaunching itself under torchrun (``launch.needs_relaunch`` sees ``LOCAL_RANK``).

Departures from submitit's helper:
  * ``CUDA_VISIBLE_DEVICES`` is left alone: Accelerate picks ``cuda:<LOCAL_RANK>`` among the visible GPUs, so each
    task must see all the node's GPUs (the presets ask for ``gpus_per_node``, not ``gpus_per_task``).
  * A job whose processes were already started by a launcher (``RANK`` set: torchrun inside a submitit job) or
    that has a single task is left as it is; a single-task job with ``hardware.num_processes > 1`` relaunches
    itself under torchrun as usual.
  * The task count must equal ``hardware.num_processes``; otherwise it stops with an error naming both.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

log = logging.getLogger(__name__)

EXPORTED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def in_submitit_job() -> bool:
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


def setup_distributed_env(cfg=None) -> Optional[dict]:
    """Call at the top of ``train.py``'s main, before anything builds an Accelerator. Returns the variables it
    exported, or None when there was nothing to do (not a submitit job, one task, or a launcher already set RANK)."""
    if not in_submitit_job() or "RANK" in os.environ:
        return None
    from submitit import JobEnvironment
    from submitit.helpers import TorchDistributedEnvironment

    job = JobEnvironment()
    if job.num_tasks == 1:
        return None
    if cfg is not None and job.num_tasks != cfg.hardware.num_processes:
        raise ValueError(
            f"submitit started {job.num_tasks} tasks ({job.num_nodes} node(s) x {job.num_tasks // job.num_nodes}) "
            f"but hardware.num_processes={cfg.hardware.num_processes}: set hardware.num_processes to the total "
            f"number of processes (hardware.num_machines x GPUs per node), or change the launcher's "
            f"tasks_per_node / nodes")
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    exported = {k: os.environ[k] for k in EXPORTED}
    log.info("submitit task %s/%s on %s: torch.distributed env %s", exported["RANK"], exported["WORLD_SIZE"],
             job.hostname, exported)
    return exported
