"""Loop pieces shared by the SFT and GRPO stages: accelerator, model setup, optimiser, checkpoints."""

from stagewise.training.accelerator import (backward_micro_batch, build_accelerator, end_run, optimizer_step, set_seed,
                                           uses_deepspeed)
from stagewise.training.checkpoint import CheckpointManager, TrainState, epoch_order, save_final
from stagewise.training.loop import StepEnd
from stagewise.training.modeling import prepare_model
from stagewise.training.optim import build_optimizer, build_scheduler

__all__ = ["backward_micro_batch", "end_run", "optimizer_step", "uses_deepspeed", "build_accelerator", "set_seed", "CheckpointManager", "StepEnd", "TrainState", "epoch_order", "save_final", "prepare_model",
           "build_optimizer", "build_scheduler"]
