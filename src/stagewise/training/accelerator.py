"""Build the Accelerator from ``hardware=``: processes, precision and DeepSpeed ZeRO through Accelerate's plugin.

Gradient accumulation is done by the stages themselves: they normalise each micro-batch loss by the number of
trained tokens (or sequences) over the whole optimizer step, across micro-batches and ranks, and call
`backward_micro_batch` below, which marks the accumulation boundary explicitly. Accelerate's own 1/K loss scaling
is therefore never used (Accelerator has gradient_accumulation_steps=1 unless DeepSpeed is on, and we call
DeepSpeed's backward with ``scale_wrt_gas=False``). Gradient clipping is done by DeepSpeed when it is on.

Batch sizes, stated once. An *optimizer step* is ``accum_steps`` micro-batches of ``hardware.per_device_batch_size``
rows on each of the ``hardware.num_processes x hardware.num_machines`` ranks. The stage says what ``accum_steps``
is, and DeepSpeed gets exactly that (``gradient_accumulation_steps``, and ``train_batch_size`` = micro-batch x
accum_steps x world):
  * SFT: ``hardware.grad_accum_steps``;
  * GRPO: one mini-batch (``stage.mini_batch_size`` prompts, all ``stage.prompts_per_step`` when 0) x ``rollout.n``
    samples, split over the ranks, in micro-batches: ``ceil(mini x n / world / per_device_batch_size)``
    (``stagewise.stages.grpo.micro_batches_per_update``); ``hardware.grad_accum_steps`` is not used. When groups
    are filtered (DAPO) a step can hold fewer micro-batches; the boundary is marked explicitly, so DeepSpeed
    still steps once per mini-batch;
  * eval and rejection sampling train nothing: no DeepSpeed (`stagewise.evaluation.inference_config`).
"""

from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

from stagewise.config import HardwareConfig

log = logging.getLogger(__name__)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def deepspeed_plugin(hw: HardwareConfig, max_grad_norm: float, accum_steps: int) -> DeepSpeedPlugin | None:
    """Accelerate's DeepSpeed plugin for ``hardware.deepspeed``, or None when ZeRO is off (``zero_stage=0``).
    ``accum_steps``: micro-batches per optimizer step, as the stage counts them (see the module docstring)."""
    ds = hw.deepspeed
    if ds.zero_stage == 0:
        return None
    if ds.zero_stage not in (2, 3):
        raise ValueError(f"hardware.deepspeed.zero_stage={ds.zero_stage} is not one of 0, 2, 3")
    plugin = DeepSpeedPlugin(
        zero_stage=ds.zero_stage,
        gradient_accumulation_steps=accum_steps,
        gradient_clipping=max_grad_norm if max_grad_norm > 0 else None,
        offload_optimizer_device="cpu" if ds.offload_optimizer else "none",
        offload_param_device="cpu" if ds.offload_params and ds.zero_stage == 3 else "none",
        zero3_save_16bit_model=ds.zero3_save_16bit_model,
        zero3_init_flag=False,
    )
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = hw.per_device_batch_size
    plugin.deepspeed_config["train_batch_size"] = (hw.per_device_batch_size * accum_steps * hw.num_processes
                                                   * hw.num_machines)
    return plugin


def build_accelerator(hw: HardwareConfig, max_grad_norm: float = 0.0, accum_steps: int = 1) -> Accelerator:
    """The Accelerator for ``hardware=``. ``max_grad_norm`` (``stage.max_grad_norm``) and ``accum_steps`` only matter
    under DeepSpeed, which clips and counts micro-batches itself; a stage that trains nothing passes neither."""
    if accum_steps < 1:
        raise ValueError(f"{accum_steps} micro-batches per optimizer step: must be >= 1")
    cpu = hw.cpu or not torch.cuda.is_available()
    mp = hw.mixed_precision
    if cpu and mp != "no":
        log.warning("hardware.mixed_precision=%s ignored on CPU (fp32)", mp)
        mp = "no"
    plugin = deepspeed_plugin(hw, max_grad_norm, accum_steps)
    handlers = []
    if cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if cpu and plugin is not None:
        # Accelerator(cpu=True) silently drops the DeepSpeed plugin (it builds MULTI_CPU DDP instead). DeepSpeed on
        # CPU needs the non-CPU code path with a gloo backend and the flag `accelerate launch` would have set.
        if torch.cuda.is_available():
            raise ValueError("hardware.cpu=true with hardware.deepspeed.zero_stage>0 needs CUDA_VISIBLE_DEVICES='' "
                             "(DeepSpeed would pick the visible GPU)")
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
        skip_deepspeed_shm_allreduce_build()
        cpu = False
    acc = Accelerator(cpu=cpu, mixed_precision=mp, deepspeed_plugin=plugin, kwargs_handlers=handlers,
                      step_scheduler_with_optimizer=False)
    log.info("accelerator: %s, %d process(es), device %s, mixed precision %s", acc.distributed_type.value,
             acc.num_processes, acc.device, mp)
    return acc


def skip_deepspeed_shm_allreduce_build() -> None:
    """Keep DeepSpeed from compiling its shared-memory all-reduce op (``deepspeed_shm_comm``) when it initialises on
    CPU. It is built with g++ on a machine's first CPU init (~35 s, before the first step), and only
    ``inference_all_reduce`` (tensor-parallel inference) calls it: ZeRO's all-gathers and reduce-scatters go through
    torch.distributed (gloo) either way. Marked incompatible, DeepSpeed skips it as it does on non-Linux systems;
    ``deepspeed.ops.__compatible_ops__`` is the dict DeepSpeed keeps for such edits (its probe runs once)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def end_run(acc: Accelerator) -> None:
    """The last call of every stage: a barrier, then Accelerate's end (trackers finished, process group torn
    down). Without the barrier a rank can tear gloo down while its peer is still inside it, and abort at exit
    ("terminate called without an active exception", SIGABRT)."""
    acc.wait_for_everyone()
    acc.end_training()


def uses_deepspeed(acc: Accelerator) -> bool:
    return acc.state.deepspeed_plugin is not None


def backward_micro_batch(acc: Accelerator, model, loss: torch.Tensor, last: bool) -> None:
    """Backward one micro-batch of an accumulated step. ``loss`` is already normalised for the whole step and
    multiplied by the world size (gradients are averaged over ranks). ``last`` marks the accumulation boundary:
    only then are gradients synchronised (DDP) or reduced and stepped (DeepSpeed)."""
    acc.gradient_state._set_sync_gradients(last)
    if uses_deepspeed(acc):
        acc.backward(loss, scale_wrt_gas=False)
    elif last or acc.num_processes == 1:
        acc.backward(loss)
    else:
        with acc.no_sync(model):
            acc.backward(loss)


def optimizer_step(acc: Accelerator, model, optimizer, scheduler, max_grad_norm: float) -> float:
    """Clip, step, zero. Returns the pre-clip global grad norm. Under DeepSpeed the engine already stepped and
    clipped inside the boundary backward; we only read its norm."""
    if uses_deepspeed(acc):
        grad_norm = acc.deepspeed_engine_wrapped.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
    else:
        if max_grad_norm > 0:
            grad_norm = float(acc.clip_grad_norm_(model.parameters(), max_grad_norm))
        else:
            grad_norm = float(torch.norm(torch.stack([p.grad.detach().norm() for p in model.parameters()
                                                      if p.grad is not None])))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return grad_norm
