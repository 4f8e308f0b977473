"""One GRPO update: the stage's old and reference log-probs, then ``ppo_epochs`` passes of one optimizer step per
mini-batch (`train_on_batch`). The recipe that calls it, and the batches it trains on, are `stagewise.stages.grpo`.

Each micro-batch loss is divided by the normaliser of the whole mini-batch on all ranks (`loss_normalizer`,
summed by `sum_over_ranks`) and multiplied by the world size (DDP averages gradients), so the update equals the
one-big-batch update for any micro-batch split and rank count. The NaN guard decides on the mini-batch's reduced
loss before the optimizer steps (`guarded_optimizer_step`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional

import numpy as np
import torch

from stagewise.algorithms import PolicyLossSettings, loss_normalizer, policy_loss, truncated_is_weights
from stagewise.tracking.alerts import STOP, NanGuard
from stagewise.training.accelerator import backward_micro_batch
from stagewise.training.batching import MicroBatch, Sample, guarded_optimizer_step, sum_over_ranks
from stagewise.training.modeling import completion_logprobs

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from stagewise.config import HardwareConfig, PolicyGradientAlgorithm


@dataclass
class StepContext:
    """What one stage's updates read: the models, the loss settings, and what carries over between steps."""

    acc: "Accelerator"
    model: torch.nn.Module  # the prepared (possibly DDP/DeepSpeed-wrapped) policy
    policy: "PreTrainedModel"  # the unwrapped policy (PEFT or plain)
    ref_model: Optional["PreTrainedModel"]  # a frozen copy when algorithm.beta > 0 without LoRA
    tokenizer: "PreTrainedTokenizerBase"
    loss: PolicyLossSettings
    alg: "PolicyGradientAlgorithm"
    hw: "HardwareConfig"
    temperature: float
    use_tis: bool
    filler: List[Sample] = field(default_factory=list)
    nan_guard: NanGuard = field(default_factory=NanGuard)  # a NaN/inf mini-batch loss skips its update


def fill_old_and_ref_logprobs(ctx: StepContext, minis: List[List[MicroBatch]], need_old: bool) -> None:
    """Old log-probs (policy before the update) when the batch feeds several optimizer steps; reference log-probs
    when ``algorithm.beta`` > 0 (a frozen copy, or the base model with the LoRA adapter disabled)."""
    need_ref = ctx.alg.beta > 0
    if not (need_old or need_ref):
        return
    head = ctx.policy.get_output_embeddings()
    chunk = ctx.hw.logprob_chunk_size
    with torch.no_grad():
        for mb in (m for mini in minis for m in mini):
            if need_old:
                mb.old_logprobs, _ = completion_logprobs(ctx.model, head, mb, chunk, ctx.temperature)
            if need_ref:
                if ctx.ref_model is not None:
                    mb.ref_logprobs, _ = completion_logprobs(ctx.ref_model, ctx.ref_model.get_output_embeddings(),
                                                             mb, chunk, ctx.temperature)
                else:  # LoRA: the base model is the reference
                    with ctx.policy.disable_adapter():
                        mb.ref_logprobs, _ = completion_logprobs(ctx.model, head, mb, chunk, ctx.temperature)


@dataclass(frozen=True)
class UpdateResult:
    """What one step's optimizer updates did."""

    metrics: Dict[str, float]  # token-weighted loss metrics, loss, grad_norm (logged under these names)
    optimizer_steps: int
    skipped_updates: int  # mini-batches without an optimizer step (nothing trained, or a non-finite loss)
    nan_stop: bool  # the NaN guard ran out of patience: checkpoint and stop

    def logged(self) -> Dict[str, float]:
        """The step's update metrics as logged, the counts and flags included."""
        return {**self.metrics, "optimizer_steps": float(self.optimizer_steps),
                "skipped_updates": float(self.skipped_updates), "nan_stop": float(self.nan_stop)}


def train_on_batch(ctx: StepContext, minis: List[List[MicroBatch]], optimizer, scheduler, max_grad_norm: float,
                   ppo_epochs: int) -> UpdateResult:
    """``ppo_epochs`` passes over the mini-batches, one optimizer step per mini-batch. Each micro-batch loss is
    normalised by the whole mini-batch's normaliser summed over micro-batches and ranks, and multiplied by the world
    size (DDP averages gradients), so the update equals the one-big-batch update for any micro-batch split.
    The metrics are token-weighted means over every update of the step."""
    acc, model = ctx.acc, ctx.model
    world = acc.num_processes
    head = ctx.policy.get_output_embeddings()
    sums: Dict[str, float] = {}
    weights: Dict[str, float] = {}
    extremes = {"clip_ratio/low_min": math.inf, "clip_ratio/high_max": -math.inf}
    losses, grad_norms, updates, skipped = [], [], 0, 0
    out_of_guard = False
    for _ in range(ppo_epochs):
        for mini in minis:
            norm = sum_over_ranks(acc, sum(float(loss_normalizer(mb.mask, ctx.loss.loss_agg)) for mb in mini))
            if norm == 0:  # nothing trained on any rank (e.g. every completion truncated and masked): no step, so
                scheduler.step()  # weight decay and Adam momentum do not move the weights without a signal
                skipped += 1
                continue
            mini_loss = torch.zeros((), device=acc.device)
            for k, mb in enumerate(mini):
                lp, ent = completion_logprobs(model, head, mb, ctx.hw.logprob_chunk_size, ctx.temperature,
                                              with_entropy=True,
                                              entropy_grad=bool(ctx.loss.entropy_coef))
                old = mb.old_logprobs if mb.old_logprobs is not None else lp.detach()
                is_w, tis_metrics = None, {}
                if ctx.use_tis and mb.rollout_logprobs is not None:
                    is_w, tis_metrics = truncated_is_weights(old, mb.rollout_logprobs, mb.mask, ctx.alg.tis_cap)
                loss, metrics = policy_loss(lp, old, mb.advantages, mb.mask, **ctx.loss.as_kwargs(), ref_logprobs=mb.ref_logprobs,
                                            is_weights=is_w, entropy=ent,
                                            normalizer=norm)
                backward_micro_batch(acc, model, loss * world, last=k == len(mini) - 1)
                mini_loss += loss.detach()
                tokens = float(mb.mask.sum())
                for name, value in {**metrics, **tis_metrics}.items():
                    sums[name] = sums.get(name, 0.0) + float(value) * tokens
                    weights[name] = weights.get(name, 0.0) + tokens
                if tokens:
                    extremes["clip_ratio/low_min"] = min(extremes["clip_ratio/low_min"],
                                                         float(metrics["clip_ratio/low_mean"]))
                    extremes["clip_ratio/high_max"] = max(extremes["clip_ratio/high_max"],
                                                          float(metrics["clip_ratio/high_mean"]))
            mini_loss = sum_over_ranks(acc, float(mini_loss))  # the same reduced value on every rank
            action, grad_norm = guarded_optimizer_step(acc, model, optimizer, scheduler, max_grad_norm,
                                                       ctx.nan_guard, mini_loss)
            if grad_norm is None:  # a non-finite loss: no update
                skipped += 1
            else:
                grad_norms.append(grad_norm)
                losses.append(mini_loss)
                updates += 1
            if action == STOP:
                out_of_guard = True
                break
        if out_of_guard:
            break
    out = {("policy_loss" if k == "pg_loss" else k): v / weights[k] for k, v in sums.items() if weights[k] > 0}
    out.update({k: v for k, v in extremes.items() if math.isfinite(v)})
    out["loss"] = float(np.mean(losses)) if losses else 0.0
    if grad_norms:
        out["grad_norm"] = float(np.mean(grad_norms))
    return UpdateResult(metrics=out, optimizer_steps=updates, skipped_updates=skipped, nan_stop=out_of_guard)
