"""stagewise: one entry point for every stage and pipeline.

    python train.py                                  # default: pipeline=tiny (SFT then GRPO on CPU)
    python train.py stage=sft data=tiny_sft          # one stage (choosing a stage turns the pipeline off)
    python train.py stage=vocab model=deepseek_r1_0528_qwen3_8b
    python train.py experiment=deepscaler/qwen3_4b_lora hardware=8xa100
    python train.py -m algorithm=grpo,dr_grpo seed=0,1 hydra/launcher=slurm

It composes the config (unknown keys and wrong types fail here, naming the key), fixes the run folder, relaunches
itself under torchrun when `hardware.num_processes` > 1, and dispatches to one stage file or to the pipeline runner.
Stages are end-of-chain code: this file imports them, the library never does.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

from stagewise.launch import set_cpu_thread_policy

set_cpu_thread_policy()  # CPU runs: passive OpenMP waiting, set before anything imports torch (OpenMP reads it once)

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from stagewise.config import register_configs
from stagewise.hydra_config import ConfigValueError, UnknownConfigKeyError, check_top_level_overrides, \
    config_error_exit, typed_config, validate_config, validate_printed_config, without_schema_options
from stagewise.run_folder import RunFolder, RunFolderInUseError, rank, register_resolvers
from stagewise.tracking.logs import job, log_to_files

STAGES = {
    "vocab": "stagewise.stages.vocab",
    "sft": "stagewise.stages.sft",
    "grpo": "stagewise.stages.grpo",
    "rejection_sampling": "stagewise.stages.rejection_sampling",
    "eval": "stagewise.stages.eval",
}

register_resolvers()
register_configs()


def run_stage(cfg: DictConfig):
    """The stage file's ``run`` with the config as objects (`typed_config`: a `TrainConfig` whose ``stage`` is the
    chosen stage's schema), not the DictConfig: stage code reads typed fields only."""
    if cfg.stage.name not in STAGES:
        raise ValueError(f"stage.name={cfg.stage.name!r} is not one of {sorted(STAGES)}")
    module = importlib.import_module(STAGES[cfg.stage.name])
    typed = typed_config(cfg)
    try:  # the stage's own checks (a GRPO stage without a reward...), before it loads anything
        getattr(module, "check_config", lambda _: None)(typed)
    except ValueError as e:
        raise ConfigValueError(str(e)) from e
    return module.run(typed)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@job  # secrets redacted from every log line; a fatal error goes to train.log too, with its traceback
def main(cfg: DictConfig):
    from stagewise.data.schema import BadRowError
    from stagewise.launch import HardwareMismatchError
    from stagewise.models import ModelNotFoundError
    from stagewise.rewards.custom import CustomRewardError
    from stagewise.rewards.runner import RewardFailedError

    try:  # errors in the config, hardware, data, model, files, run folder or rewards: one line ("Error: ..."); the
        return _main(cfg)  # traceback goes to train.log only (when the run folder exists by then)
    except (UnknownConfigKeyError, ConfigValueError, BadRowError, HardwareMismatchError, RunFolderInUseError,
            RewardFailedError, ModelNotFoundError, CustomRewardError, FileNotFoundError) as e:
        log_to_files(logging.ERROR, f"fatal error: {type(e).__name__}: {e}", exc_info=sys.exc_info())
        raise config_error_exit(e) from None


def _main(cfg: DictConfig):
    from stagewise.launch import check_hardware, needs_relaunch, relaunch_distributed
    from stagewise.training.distributed_env import setup_distributed_env

    validate_config(cfg)  # also done before the run folder by the ValidateConfig callback; here for multirun jobs
    with open_dict(cfg):
        cfg.run_dir = HydraConfig.get().runtime.output_dir
        cfg.run_id = str(cfg.run_id)  # resolve once; children inherit it through $STAGEWISE_RUN_ID
    if HydraConfig.get().mode != RunMode.MULTIRUN:  # a sweep's jobs share the exported id
        os.environ["STAGEWISE_RUN_ID"] = cfg.run_id  # also when run_id=<id> was given
    from stagewise.pipeline import run_mode, run_pipeline

    choices = HydraConfig.get().runtime.choices
    check_hardware(cfg.hardware, choices.get("hardware"))  # done by the CheckHardware callback for single runs
    if run_mode(cfg, choices) == "pipeline":
        return run_pipeline(cfg, HydraConfig.get().overrides.task, HydraConfig.get().overrides.hydra)
    setup_distributed_env(cfg)  # submitit tasks become torch.distributed ranks before any Accelerator exists
    run_folder = RunFolder(cfg.run_dir)
    if str(cfg.resume) == "auto" and run_folder.finished() and "LOCAL_RANK" not in os.environ:
        logging.getLogger("stagewise").info(
            "%s already finished (it wrote %s): nothing to do. resume=overwrite trains it again; another run_id "
            "starts a new run", run_folder.root, "final/" if run_folder.final.exists() else "result.json")
        return None
    if rank() == 0 and "LOCAL_RANK" not in os.environ:  # once: here, not in the ranks a relaunch starts
        run_folder.prepare_for(str(cfg.resume))
    if needs_relaunch(cfg):
        return relaunch_distributed(cfg, __file__, HydraConfig.get().overrides.task)
    return run_stage(cfg)


if __name__ == "__main__":
    check_top_level_overrides(sys.argv[1:], os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf"))
    validate_printed_config(sys.argv[1:], __file__)  # `--cfg job` exits inside Hydra before any check runs
    if {"--help", "-h"} & set(sys.argv[1:]):
        import contextlib
        import io

        try:
            with contextlib.redirect_stdout(io.StringIO()) as text:
                main()
        finally:  # Hydra exits after printing
            print(without_schema_options(text.getvalue()), end="")
    else:
        main()
