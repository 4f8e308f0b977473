"""AdamW with decoupled weight decay (not on biases and norms) and a warmup + decay schedule."""

from __future__ import annotations

import math

import torch
from transformers import get_scheduler

from stagewise.config import TrainingStageBase

SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")


def build_optimizer(model: torch.nn.Module, stage: TrainingStageBase) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": stage.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=stage.learning_rate, betas=(stage.adam_beta1, stage.adam_beta2))


def build_scheduler(optimizer: torch.optim.Optimizer, stage: TrainingStageBase, total_steps: int):
    if stage.lr_scheduler not in SCHEDULERS:
        raise ValueError(f"stage.lr_scheduler={stage.lr_scheduler!r} is not one of {list(SCHEDULERS)}")
    warmup = math.ceil(stage.warmup_ratio * total_steps)
    return get_scheduler(stage.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
