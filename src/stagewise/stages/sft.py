"""Stage ``sft``: supervised fine-tuning on chat data (DeepAnalyze stages 1-2, DeepSeek-R1 stage 1).

    python train.py stage=sft data=<preset>                          # tiny model on CPU
    python train.py experiment=deepanalyze/single_ability hardware=8xa100

Features (flag):
  * assistant-only loss through the chat template; ``<Execute>``..``</Execute>`` spans carry no loss
    (``data.mask_execute``); over-long samples dropped or truncated (``data.overlong``)
  * best-fit-decreasing packing with per-document position ids and no cross-document attention (``data.packing``)
  * exact gradient accumulation: each micro-batch loss is divided by the number of trained tokens of the whole
    optimizer step, summed over micro-batches *and ranks* (``hardware.grad_accum_steps``); this is the 2024
    transformers/TRL bug class where per-micro-batch means over-weight short batches; micro-batches of
    ``per_device_batch_size`` rows, or of at most ``hardware.max_tokens_per_micro_batch`` tokens
  * padding-free micro-batches: one unpadded row with ``cu_seq_lens`` under ``sdpa_varlen`` / flash-attention;
    Liger's fused linear cross-entropy for the loss with ``hardware.use_liger`` on a GPU
  * AdamW with weight decay, warmup + cosine/linear/constant schedule, gradient clipping (``stage.*``)
  * bf16, gradient checkpointing, LoRA, Liger, DeepSpeed ZeRO-2/3 with offload (``hardware=``, ``model.lora``)
  * periodic eval loss (``stage.eval_steps``), checkpoints every N steps keeping the last K (``stage.save_steps``,
    ``stage.save_total_limit``), exact resume (``resume=auto``), HF model in ``final/``
  * generative eval on the held-out prompts when ``reward=`` names a reward, at the start (the baseline), every
    ``stage.eval_steps`` and at the end: mean reward,
    ``eval/accuracy``, ``eval/pass@k`` (`stagewise.evaluation`; ``stage.pass_k``, ``stage.acceptance_threshold``)
  * early stopping on any eval metric with patience (``stage.early_stopping_metric``, ``early_stopping_patience``);
    the best model is kept in ``best/`` and becomes ``final/`` (`stagewise.training.early_stopping`)
Data order is a seeded permutation per epoch; the position in it is part of the checkpoint, so a resumed run
sees the same batches and gives the same per-step losses as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from stagewise.config import SFTStage, TrainConfig, stage_as
from stagewise.data import IGNORE_INDEX, PackedDataset, SFTCollator, load_sources, tokenize_sft
from stagewise.evaluation import GenerativeEval
from stagewise.models import load_model_and_tokenizer, num_params
from stagewise.run_folder import RunFolder
from stagewise.tracking import Tracker, progress
from stagewise.tracking.alerts import STOP, NanGuard
from stagewise.training import (
    CheckpointManager,
    StepEnd,
    TrainState,
    backward_micro_batch,
    build_accelerator,
    build_optimizer,
    build_scheduler,
    end_run,
    prepare_model,
    set_seed,
)
from stagewise.tracking.window import Window
from stagewise.training.batching import forwards_per_rank, guarded_optimizer_step, micro_batch_parts
from stagewise.training.early_stopping import EarlyStopping
from stagewise.training.preemption import install_preemption_handler
from stagewise.training.modeling import liger_usable, sequence_nll_sum

log = logging.getLogger(__name__)


def step_rows(order: np.ndarray, step_in_epoch: int, global_batch: int) -> np.ndarray:
    """Row indices of one optimizer step. The last step of an epoch wraps around to the epoch's start."""
    idx = np.arange(step_in_epoch * global_batch, (step_in_epoch + 1) * global_batch) % len(order)
    return order[idx]


def build_sft_datasets(cfg: TrainConfig, tokenizer):
    """Sources -> chat rows -> tokenised rows (cached) -> packed bins when ``data.packing``. Returns
    ``(train, eval or None, report)`` where ``report`` holds flat numbers for the log."""
    cache = cfg.data.cache_dir or f"{cfg.paths.cache_dir}/tokenized"
    splits = load_sources(cfg.data, cache_dir=cache)
    train, stats = tokenize_sft(splits.train, tokenizer, cfg.data, cache_dir=cache)
    report = {"rows": stats.rows_out, "overlong_dropped": stats.overlong_dropped, "truncated": stats.truncated,
              "trained_tokens": stats.trained_tokens, "tokenize_rows_per_s": round(stats.rows_per_s, 1)}
    eval_ds = None
    if splits.eval is not None:
        eval_ds, _ = tokenize_sft(splits.eval, tokenizer, cfg.data, cache_dir=cache)
    if len(train) == 0:
        raise ValueError(f"no training rows left after tokenisation ({stats.as_dict()}); "
                         f"check data.max_length={cfg.data.max_length} and data.overlong")
    if cfg.data.packing:
        train = PackedDataset(train, cfg.data.max_length)
        report["packing_efficiency"] = round(train.efficiency, 4)
        report["packed_rows"] = len(train)
        if eval_ds is not None:
            eval_ds = PackedDataset(eval_ds, cfg.data.max_length)
    return train, eval_ds, report


def trained_targets(batch: dict) -> torch.Tensor:
    """Mask of next-token targets that carry loss, aligned with ``logprobs`` ([B, T-1])."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).to(torch.float32)


def micro_batch_loss(model, batch: dict, step_tokens: int, chunk_size: int, fused_ce: bool) -> torch.Tensor:
    """A micro-batch's share of the step loss: its summed NLL over trained tokens divided by the trained tokens of
    the whole optimizer step (all micro-batches, all ranks), so the shares add up to the step's token mean
    (`stagewise.algorithms.sft_loss` explains the normaliser)."""
    nll_sum = sequence_nll_sum(model, batch["input_ids"], trained_targets(batch), position_ids=batch.get("position_ids"),
                               attention_mask=batch.get("attention_mask"), cu_seq_lens=batch.get("cu_seq_lens"),
                               chunk_size=chunk_size, fused_ce=fused_ce)
    return nll_sum / max(step_tokens, 1)


def run(cfg: TrainConfig) -> dict:
    # ------------------------------------------------------------------ setup
    st = stage_as(cfg, SFTStage)
    set_seed(cfg.seed)
    acc = build_accelerator(cfg.hardware, st.max_grad_norm, cfg.hardware.grad_accum_steps)
    run_folder = RunFolder(cfg.run_dir)
    hw = cfg.hardware
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    model = prepare_model(model, cfg.model.lora, cfg.hardware)
    with acc.main_process_first():
        train_ds, eval_ds, data_report = build_sft_datasets(cfg, tokenizer)
    collate = SFTCollator.for_model(model, tokenizer.pad_token_id)  # one unpadded row (flash, sdpa_varlen)
    fused_ce = hw.use_liger and liger_usable()  # Liger's fused linear cross-entropy for the loss
    if fused_ce:
        log.info("sft: loss through Liger's fused linear cross-entropy (hardware.use_liger)")

    world = acc.num_processes
    global_batch = world * hw.per_device_batch_size * hw.grad_accum_steps
    steps_per_epoch = max(1, math.ceil(len(train_ds) / global_batch))
    total_steps = st.max_steps if st.max_steps > 0 else math.ceil(steps_per_epoch * st.num_epochs)
    optimizer = build_optimizer(model, st)
    scheduler = build_scheduler(optimizer, st, total_steps)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    ckpt = CheckpointManager(acc, run_folder, keep_last=st.save_total_limit)
    state = TrainState()
    resume_from = ckpt.resume_path(cfg.resume)
    if resume_from is not None:
        state = ckpt.load(resume_from)
    tracker = Tracker(cfg, run_folder.root, stage="sft", is_main=acc.is_main_process, resume_step=state.step)
    if acc.is_main_process:
        log.info("sft: %d train rows (%s), %.2fM params, global batch %d = %d procs x %d x %d accum, %d steps",
                 len(train_ds), data_report, num_params(model) / 1e6, global_batch, world,
                 hw.per_device_batch_size, hw.grad_accum_steps, total_steps)
        tracker.log({f"data/{k}": v for k, v in data_report.items() if isinstance(v, (int, float))}, step=state.step)
    gen_eval = GenerativeEval.from_config(cfg, acc, acc.unwrap_model(model), tokenizer)  # only with reward=
    stopper = EarlyStopping.from_config(st, state.extra, has_loss=eval_ds is not None,
                                        has_generative=gen_eval is not None)  # None without early_stopping_metric

    # ------------------------------------------------------------------ train
    install_preemption_handler()  # SIGUSR1/SIGTERM -> checkpoint at the next step boundary, exit for requeue
    nan_guard = NanGuard(st.max_nonfinite_steps)
    end = StepEnd(acc, ckpt, model, tokenizer, run_folder, tracker, stopper, nan_guard, eval_steps=st.eval_steps,
                  save_steps=st.save_steps, total_steps=total_steps)
    evaluate = (lambda: run_evals(acc, model, eval_ds, collate, hw, gen_eval)) \
        if eval_ds is not None or gen_eval is not None else None
    if gen_eval is not None and state.step == 0:  # the baseline the stage is measured against
        tracker.log(run_evals(acc, model, None, None, hw, gen_eval), step=0)
    model.train()
    bar = progress(total=total_steps, initial=state.step, desc="sft",
                   enabled=acc.is_main_process and cfg.logger.progress_bar)
    window = Window()
    while state.step < total_steps:
        order = state.epoch_order(len(train_ds), cfg.seed)
        rows = step_rows(order, state.batch_in_epoch, global_batch)
        mine = [train_ds[int(i)] for i in rows[acc.process_index::world]]  # this rank's rows of the step
        micro = micro_batch_parts([len(r["input_ids"]) for r in mine], hw.per_device_batch_size,
                                  hw.max_tokens_per_micro_batch)
        batches = [acc_to_device(collate([mine[i] for i in m]), acc.device) for m in micro]

        # the normaliser: trained tokens of the whole optimizer step, over all micro-batches and ranks
        local_tokens = sum(int(trained_targets(b).sum()) for b in batches)
        step_tokens = int(acc.reduce(torch.tensor(local_tokens, device=acc.device), reduction="sum"))
        # every rank runs as many micro-batches as the busiest: a rank short of them repeats its first with
        # weight 0, which trains nothing
        counts = forwards_per_rank(acc, len(batches)) if hw.max_tokens_per_micro_batch > 0 else [len(batches)]
        forwards = max(counts)
        weights = [1.0] * len(batches) + [0.0] * (forwards - len(batches))
        step_loss = torch.zeros((), device=acc.device)
        for k, weight in enumerate(weights):
            loss = micro_batch_loss(model, batches[k if weight else 0], step_tokens, hw.logprob_chunk_size, fused_ce)
            backward_micro_batch(acc, model, loss * (world * weight), last=k == forwards - 1)
            step_loss += loss.detach() * weight
        step_loss = float(acc.reduce(step_loss, reduction="sum"))
        action, grad_norm = guarded_optimizer_step(acc, model, optimizer, scheduler, st.max_grad_norm, nan_guard,
                                                   step_loss)  # a NaN/inf loss skips its update

        state.step += 1
        state.advance(steps_per_epoch)
        bar.update(1)
        window.add({"loss": step_loss}, tokens=step_tokens)

        if state.step % st.logging_steps == 0 or state.step == total_steps:
            metrics = {
                "loss": step_loss,  # this step's loss (exactly normalised); loss_avg averages the window
                "loss_avg": window.means()["loss"],
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float("nan") if grad_norm is None else grad_norm,
                "epoch": state.epoch + state.batch_in_epoch / steps_per_epoch,
                "tokens_per_s": window.total("tokens") / max(window.seconds(), 1e-9),
                "trained_tokens": step_tokens,
                # with a token budget: forwards per rank, and the weight-0 ones all ranks ran to keep in step
                **({"micro_batches": forwards, "micro_batches_idle": sum(forwards - c for c in counts)}
                   if hw.max_tokens_per_micro_batch > 0 else {}),
            }
            tracker.log(metrics, step=state.step)
            bar.set_postfix(loss=f"{step_loss:.4f}")
            window = Window()
        if end.after_step(state, evaluate, nan_stop=action == STOP):
            break
    bar.close()

    # ------------------------------------------------------------------ save
    final_metrics = {"step": state.step, **end.finish(state, evaluate)}  # final/: the best model under early stopping

    # ------------------------------------------------------------------ cleanup
    if gen_eval is not None:
        gen_eval.close()
    tracker.close()
    if acc.is_main_process:
        log.info("saved %s", run_folder.final)
    end_run(acc)
    return final_metrics


def acc_to_device(batch: dict, device) -> dict:
    """The batch on ``device``, except ``cu_seq_lens``: the attention reads it on the host, once per layer."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) and k != "cu_seq_lens" else v for k, v in batch.items()}


def run_evals(acc, model, eval_ds, collate, hw, gen_eval) -> dict:
    """``eval/loss`` on the held-out rows, plus the generative metrics when a reward is configured."""
    out = {}
    if eval_ds is not None:
        out["eval/loss"] = evaluate_loss(acc, model, eval_ds, collate, hw)
    if gen_eval is not None:
        out.update(gen_eval())
    return out


@torch.no_grad()
def evaluate_loss(acc, model, eval_ds, collate, hw) -> float:
    """Token-weighted mean loss over the eval set (every rank takes a strided share)."""
    model.eval()
    total, tokens = torch.zeros((), device=acc.device), torch.zeros((), device=acc.device)
    idx = list(range(acc.process_index, len(eval_ds), acc.num_processes))
    for i in range(0, len(idx), hw.per_device_batch_size):
        batch = acc_to_device(collate([eval_ds[j] for j in idx[i:i + hw.per_device_batch_size]]), acc.device)
        mask = trained_targets(batch)
        total += sequence_nll_sum(model, batch["input_ids"], mask, position_ids=batch.get("position_ids"),
                                  attention_mask=batch.get("attention_mask"), cu_seq_lens=batch.get("cu_seq_lens"),
                                  chunk_size=hw.logprob_chunk_size)
        tokens += mask.sum()
    model.train()
    total, tokens = acc.reduce(total, reduction="sum"), acc.reduce(tokens, reduction="sum")
    return float(total / tokens.clamp(min=1))
