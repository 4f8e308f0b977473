"""Stage ``grpo``: group-relative policy optimisation on prompts with verifiable rewards (DeepSeek-R1,
arXiv:2501.12948; DeepScaleR; the R1-Zero tutorial github.com/FareedKhan-dev/train-deepseek-r1).

    python train.py stage=grpo data=<prompts> reward=<preset>                     # tiny model on CPU
    python train.py experiment=deepscaler/qwen3_4b_lora hardware=8xa100             # DeepScaleR recipe
    python train.py experiment=r1_zero/qwen2_5_7b_countdown                         # R1-Zero tutorial

One step (``stage.*``, ``rollout.*``, ``algorithm.*``, ``hardware.*``):
  1. take ``prompts_per_step`` prompts in a seeded per-epoch order (the position is checkpointed: exact resume)
  2. generate ``rollout.n`` completions each (``rollout.backend`` hf | vllm | vllm_server; temperature 0 with n > 1
     is refused), decode, score with the weighted rewards (``reward.functions``; None is left out of the sum).
     With ``env=code_sandbox`` a completion is a multi-turn trajectory from the agent loop
     (`stagewise.rollout.multiturn`: code run in a sandbox, ``<Execute>`` spans inserted); its env tokens carry no
     loss, and its turns and code errors reach the rewards as columns and the logs as ``env/*``
  3. group advantages (``algorithm.adv_scale`` group | batch | none); groups with identical rewards can be dropped
     (``filter_zero_std_groups``) and refilled by at most ``max_resample_rounds`` extra generation rounds (DAPO
     dynamic sampling); truncated completions can be masked out of the loss (``mask_truncated``)
  4. old log-probs from the policy before the update, only when the batch is used for more than one optimizer step
     (``ppo_epochs`` x ``prompts_per_step / mini_batch_size`` > 1; otherwise they equal the detached current ones,
     as TRL notes); reference log-probs only when ``algorithm.beta`` > 0, from a frozen copy or, with LoRA, from the
     base model with the adapter disabled. Log-probs are computed on completion tokens only, in chunks
     (``hardware.logprob_chunk_size``) when their logits would be large, never as full-vocabulary logits for a
     batch; each distinct prompt of a micro-batch runs once for its group (exact): padded micro-batches share its
     KV cache (off under ``hardware.gradient_checkpointing``), packed ones lay it down once with the group's
     completions after it (`stagewise.models.attention`, also under checkpointing); generation prefills each
     prompt once for its ``n`` samples
  5. ``ppo_epochs`` x mini-batches of ``mini_batch_size`` prompts, one optimizer step each, micro-batches of
     ``hardware.per_device_batch_size`` sequences, or unpadded rows of at most ``hardware.max_tokens_per_micro_batch``
     tokens when that is set; each micro-batch loss is divided by the normaliser of the whole mini-batch on all
     ranks, so accumulation is exact for every ``algorithm.loss_agg``
  6. with vLLM: truncated importance sampling against the engine's log-probs (``algorithm.tis_cap``; null = off),
     and the new weights are pushed to the engine (LoRA merged) before the next generation
With ``stage.max_staleness`` = k > 0 (asynchronous GRPO) steps 1-2 run ahead in a generator process, on weights at
most k steps old (`stagewise.rollout.prompt_batches`, `stagewise.rollout.async_generation`); the loss is then the
decoupled objective: the clip against the trainer's log-probs at the step's weights (the old log-probs), the TIS
weights against the generator's (behaviour) log-probs.
Logs TRL's metric set for every step in metrics.jsonl (and W&B / TensorBoard), and every ``logging_steps`` the
R1-Zero tutorial's console block over the steps since the last one (see `stagewise.tracking.console`);
``samples/step_<N>.parquet`` every ``samples_steps``; held-out mean reward (greedy) at step 0, every ``eval_steps``
and at the end when the data has eval prompts; checkpoints every ``save_steps``; ``final/`` at the end. LoRA, gradient checkpointing, ZeRO-2/3 and precision come from ``model.lora`` and
``hardware=`` as for SFT. The held-out eval is `stagewise.evaluation` (``eval/accuracy``, ``eval/pass@k`` with
``stage.pass_k``); early stopping on any of its metrics (``stage.early_stopping_metric``, ``_patience``; the step-0
eval is the baseline) keeps the best model in ``best/`` and makes it ``final/`` (`stagewise.training.early_stopping`).

The logged ``loss`` is ~0 with one optimizer step per batch: the ratio is 1 and group advantages average to 0, so
the loss value carries no information (the usual cause of "GRPO loss is 0" bug reports); its gradient does. Watch
the rewards, ``grad_norm``, ``kl``, ``entropy`` and the clip ratios instead.

Where we depart from peers:
  * Shared-prompt training (above) and a prompt prefilled once per group: TRL and verl run every prompt ``n`` times.
  * The LR schedule counts optimizer steps (``total_steps x updates per step``), like verl's mini-batch updates.
  * A mini-batch with no trained token on any rank (all truncated and masked) takes no optimizer step.
  * Reward/length statistics are over every completion generated in the step (dynamic-sampling rounds included);
    the loss is over the kept groups only.
  * Completions keep their stop token (EOS is trained) and stop strings stay in the text the rewards see.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List

import numpy as np
import torch

from stagewise.algorithms import PolicyLossSettings, check_algorithm_config, group_advantages
from stagewise.config import GRPOStage, TrainConfig, stage_as
from stagewise.data import load_prompt_dataset
from stagewise.models import frozen_copy, load_model_and_tokenizer, num_params
from stagewise.rewards import RewardRunner
from stagewise.rewards.runner import data_files
from stagewise.rollout import RolloutBatch, build_generator, check_sampling, reward_columns
from stagewise.rollout.prompt_batches import AsyncBatches, SyncBatches
from stagewise.run_folder import RunFolder
from stagewise.tracking import Tracker, progress
from stagewise.tracking.console import format_grpo_console
from stagewise.tracking.rl_metrics import PhaseTimer, memory_metrics, per_sample_arrays, rollout_statistics
from stagewise.tracking.samples import GroupKey, sample_records, write_samples
from stagewise.tracking.window import Window
from stagewise.training import (
    CheckpointManager,
    StepEnd,
    TrainState,
    build_accelerator,
    build_optimizer,
    build_scheduler,
    end_run,
    prepare_model,
    set_seed,
)
from stagewise.tracking.alerts import NanGuard, NoSignalWatch, warn_nothing_trained
from stagewise.training.preemption import install_preemption_handler
from stagewise.evaluation import EvalSpec, evaluate_prompts
from stagewise.training.early_stopping import EarlyStopping
from stagewise.models.attention import shares_prefix_in_packed_rows
from stagewise.training.batching import (MicroBatch, RowLayout, Sample, collate, forwards_per_rank,
                                        micro_batch_parts, sum_over_ranks)
from stagewise.training.policy_update import StepContext, fill_old_and_ref_logprobs, train_on_batch

log = logging.getLogger(__name__)


# ============================================================================================ the stage
def run(cfg: TrainConfig) -> dict:
    # ------------------------------------------------------------------ setup
    check_config(cfg)
    st = stage_as(cfg, GRPOStage)
    set_seed(cfg.seed)
    hw = cfg.hardware
    acc = build_accelerator(hw, st.max_grad_norm, micro_batches_per_update(
        st, cfg.rollout.n, hw.num_processes * hw.num_machines, hw.per_device_batch_size))
    run_folder = RunFolder(cfg.run_dir)
    alg, ro = cfg.algorithm, cfg.rollout
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    ref_model = frozen_copy(model) if alg.beta > 0 and not cfg.model.lora.enabled else None
    model = prepare_model(model, cfg.model.lora, cfg.hardware)
    with acc.main_process_first():
        data = load_prompt_dataset(cfg.data, tokenizer)
    train_ds, eval_ds = data.train, data.eval
    plan = StepPlan.build(cfg, acc.num_processes, len(train_ds),
                          varlen_attention=shares_prefix_in_packed_rows(model))
    rewards = RewardRunner(cfg.reward)
    rewards.check_columns(train_ds.column_names, data_files(cfg.data))  # a gold column missing: stop here
    optimizer = build_optimizer(model, st)
    scheduler = build_scheduler(optimizer, st, plan.total_steps * plan.updates_per_step)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    if ref_model is not None:
        ref_model.to(acc.device)
    policy = acc.unwrap_model(model)
    asynchronous = st.max_staleness > 0
    # engine log-probs: vLLM's (TIS), or the generator process's (the decoupled objective's behaviour policy)
    tis = alg.tis_cap is not None and (ro.backend != "hf" or asynchronous)
    # env=code_sandbox: the multi-turn agent loop drives the backend
    rollout = build_generator(cfg, policy, tokenizer, accelerator=acc, run_dir=run_folder.root, return_logprobs=tis)
    ckpt = CheckpointManager(acc, run_folder, keep_last=st.save_total_limit)
    state = TrainState(extra={"num_tokens": 0})
    resume_from = ckpt.resume_path(cfg.resume)
    if resume_from is not None:
        state = ckpt.load(resume_from)
        rollout.sync_weights(policy)
    tracker = Tracker(cfg, run_folder.root, stage="grpo", is_main=acc.is_main_process, resume_step=state.step,
                      console_formatter=format_grpo_console)
    ctx = StepContext(acc=acc, model=model, policy=policy, ref_model=ref_model, tokenizer=tokenizer,
                      loss=PolicyLossSettings.from_config(alg, ro.max_new_tokens), alg=alg, hw=hw,
                      temperature=float(ro.temperature), use_tis=tis)
    batches = (AsyncBatches.start(cfg, policy, train_ds, state, plan) if asynchronous
               else SyncBatches(rollout, train_ds, state, plan))
    if acc.is_main_process:
        log.info("grpo: %d train prompts, %s eval, %.2fM params (%.2fM trainable); %s", len(train_ds),
                 len(eval_ds) if eval_ds is not None else "no", num_params(policy) / 1e6,
                 num_params(policy, trainable_only=True) / 1e6, plan.describe())

    # ------------------------------------------------------------------ train
    stopper = EarlyStopping.from_config(st, state.extra, has_loss=False, has_generative=eval_ds is not None)
    ctx.nan_guard = NanGuard(st.max_nonfinite_steps)
    end = StepEnd(acc, ckpt, model, tokenizer, run_folder, tracker, stopper, ctx.nan_guard, eval_steps=st.eval_steps,
                  save_steps=st.save_steps, total_steps=plan.total_steps)
    held_out = (lambda: evaluate(acc, rollout, eval_ds, rewards, cfg)) if eval_ds is not None else None
    if held_out is not None and state.step == 0:  # the starting model is the baseline the patience counts from
        end.log_eval(held_out(), 0)
    bar = progress(total=plan.total_steps, initial=state.step, desc="grpo", enabled=bar_enabled(acc, cfg))
    window = Window()
    no_signal = NoSignalWatch()
    install_preemption_handler()  # SIGUSR1/SIGTERM -> checkpoint at the next step boundary, exit for requeue
    model.train()
    while state.step < plan.total_steps:
        timer = PhaseTimer()
        step_start = time.perf_counter()
        # 1-3. rollouts, rewards, advantages (dynamic sampling refills groups with identical rewards)
        groups = collect_groups(acc, batches, rewards, plan, alg, timer)
        # 4. micro-batches, old and reference log-probs (old = the decoupled objective's proximal policy; with one
        # update per step it is the update's own detached forward, as in the synchronous loop: no extra pass)
        minis = make_mini_batches(ctx, groups.samples, plan, acc)
        with timer("logprobs"):
            fill_old_and_ref_logprobs(ctx, minis, need_old=plan.updates_per_step > 1)
        # 5. PPO epochs x mini-batches, one optimizer step each
        with timer("update"):
            update = train_on_batch(ctx, minis, optimizer, scheduler, st.max_grad_norm, st.ppo_epochs)
        if update.skipped_updates or not minis:
            warn_nothing_trained(groups.groups_kept, len(groups.rounds), ro.max_new_tokens)
        no_signal.add(groups.frac_zero_std, groups.log_arrays.get("reward/total"))
        with timer("sync"):
            batches.push_weights(policy, version=state.step + 1)

        # bookkeeping
        state.step += 1
        batches.after_step(state.step)
        state.extra["num_tokens"] = state.extra.get("num_tokens", 0) + groups.num_tokens
        bar.update(1)
        timer.add("step", time.perf_counter() - step_start)
        # metrics.jsonl (and W&B / TensorBoard) get every step; the console a summary of each logging window
        step_scalars = {**update.logged(), **groups.sampling_metrics(), **batches.metrics(),
                        **{f"time/{k}": v for k, v in timer.seconds.items()}}
        window.add(step_scalars, arrays=groups.log_arrays, step_seconds=timer.seconds["step"])
        progress_now = {"lr": scheduler.get_last_lr()[0], "num_tokens": state.extra["num_tokens"],
                        "epoch": state.epoch + state.batch_in_epoch / plan.steps_per_epoch, **memory_metrics()}
        tracker.log({**step_scalars, **rollout_statistics(groups.log_arrays, groups.reward_names,
                                                          timer.seconds["step"]), **progress_now},
                    step=state.step, console=False)
        if state.step % st.logging_steps == 0 or state.step == plan.total_steps:
            summary = {**window.means(), **rollout_statistics(window.arrays(), groups.reward_names,
                                                              window.total("step_seconds")), **progress_now}
            tracker.show(summary, step=state.step)
            bar.set_postfix(reward=f"{summary.get('reward/total/mean', float('nan')):.3f}")
            window = Window()
        if st.samples_steps and state.step % st.samples_steps == 0:
            write_samples(acc, run_folder.sample_file(state.step), groups.records(), state.step)
        if end.after_step(state, held_out, nan_stop=update.nan_stop):
            break
    bar.close()

    # ------------------------------------------------------------------ save
    final_metrics: Dict[str, Any] = end.finish(state, held_out)  # final/: the best model under early stopping
    final_metrics["step"] = state.step

    # ------------------------------------------------------------------ cleanup
    tracker.close()
    rewards.close()
    batches.close()
    rollout.close()
    if acc.is_main_process:
        log.info("saved %s", run_folder.final)
    end_run(acc)
    return final_metrics


# ============================================================================================ config
def bar_enabled(acc, cfg: TrainConfig) -> bool:
    return acc.is_main_process and bool(cfg.logger.progress_bar)


def check_config(cfg: TrainConfig) -> None:
    """Fail before loading anything, naming the bad key."""
    check_algorithm_config(cfg.algorithm)
    if cfg.algorithm.name == "sft":
        raise ValueError("stage=grpo needs a policy-gradient objective: algorithm=grpo|dr_grpo|dapo|gspo "
                         "(got algorithm=sft)")
    ro, st = cfg.rollout, cfg.stage
    check_sampling(ro.n, ro.temperature, ro.top_p, ro.top_k, ro.max_new_tokens)
    EvalSpec.from_config(st, ro)  # stage.pass_k / eval_num_samples: fail now, not at the first held-out eval
    for key in ("prompts_per_step", "ppo_epochs", "logging_steps"):
        if getattr(st, key) < 1:
            raise ValueError(f"stage.{key}={getattr(st, key)!r} must be >= 1")
    if st.mini_batch_size < 0 or (st.mini_batch_size and st.prompts_per_step % st.mini_batch_size):
        raise ValueError(f"stage.mini_batch_size={st.mini_batch_size} must divide stage.prompts_per_step="
                         f"{st.prompts_per_step} (or be 0 = one optimizer step per rollout batch)")
    if not cfg.reward.functions:
        raise ValueError("stage=grpo needs at least one reward: set reward=<preset> or reward.functions")
    if cfg.hardware.per_device_batch_size < 1:
        raise ValueError(f"hardware.per_device_batch_size={cfg.hardware.per_device_batch_size!r} must be >= 1")
    if st.max_staleness < 0 or st.generator_threads < 1:
        raise ValueError(f"stage.max_staleness={st.max_staleness!r} must be >= 0 and stage.generator_threads="
                         f"{st.generator_threads!r} >= 1")
    if st.max_staleness > 0:  # what asynchronous GRPO does not run yet, each with the setting to change
        limits = [(ro.backend != "hf", f"rollout={ro.backend} (the generator process runs rollout=hf)"),
                  (cfg.hardware.num_processes * cfg.hardware.num_machines > 1, "more than one training process"),
                  (cfg.model.lora.enabled, "model.lora.enabled=true (the generator loads full weights)"),
                  (cfg.algorithm.max_resample_rounds > 0, "algorithm.max_resample_rounds > 0"),
                  (cfg.algorithm.tis_cap is None, "algorithm.tis_cap=null (the off-policy correction needs a cap)")]
        bad = [why for cond, why in limits if cond]
        if bad:
            raise ValueError(f"stage.max_staleness={st.max_staleness} (asynchronous GRPO) does not run with "
                             f"{'; '.join(bad)}: change it or set stage.max_staleness=0")


def micro_batches_per_update(stage, n: int, world: int, per_device_batch_size: int) -> int:
    """Micro-batches per rank in one optimizer step: one mini-batch of ``stage.mini_batch_size`` prompts (all
    ``stage.prompts_per_step`` when 0) x ``n`` samples, split over ``world`` ranks, ``per_device_batch_size``
    sequences at a time. What DeepSpeed is told (see `stagewise.training.accelerator`)."""
    mini = stage.mini_batch_size or stage.prompts_per_step
    return max(1, math.ceil(mini * n / world / per_device_batch_size))


@dataclass
class StepPlan:
    prompts_per_step: int
    n: int
    mini_batches: int  # optimizer steps per PPO epoch
    ppo_epochs: int
    steps_per_epoch: int  # prompt batches in one pass over the data
    total_steps: int
    world: int
    per_device_batch_size: int
    filter_groups: bool
    max_resample_rounds: int
    seed: int = 0
    max_tokens_per_micro_batch: int = 0
    layout: RowLayout = RowLayout.PADDED_SHARED_PREFIX  # what a micro-batch's rows are (`RowLayout.choose`)

    def __post_init__(self):
        if self.layout.packed != (self.max_tokens_per_micro_batch > 0):
            raise ValueError(f"StepPlan: layout {self.layout.value!r} with max_tokens_per_micro_batch="
                             f"{self.max_tokens_per_micro_batch} (packed rows go with a token budget > 0)")

    @property
    def updates_per_step(self) -> int:
        return self.mini_batches * self.ppo_epochs

    @classmethod
    def build(cls, cfg: TrainConfig, world: int, num_prompts: int, varlen_attention: bool = False) -> "StepPlan":
        """``varlen_attention``: the policy runs ``sdpa_varlen`` attention (`shares_prefix_in_packed_rows`)."""
        st = cfg.stage
        p = st.prompts_per_step
        if p % world:
            raise ValueError(f"stage.prompts_per_step={p} must be a multiple of the number of processes ({world})")
        if num_prompts < p:
            raise ValueError(f"the training data has {num_prompts} prompts, fewer than stage.prompts_per_step={p}")
        mini = st.mini_batch_size or p
        steps_per_epoch = num_prompts // p
        total = st.max_steps if st.max_steps > 0 else math.ceil(st.num_epochs * steps_per_epoch)
        hw = cfg.hardware
        plan = cls(prompts_per_step=p, n=cfg.rollout.n, mini_batches=p // mini, ppo_epochs=st.ppo_epochs,
                   steps_per_epoch=steps_per_epoch, total_steps=max(1, total), world=world,
                   per_device_batch_size=hw.per_device_batch_size,
                   filter_groups=bool(cfg.algorithm.filter_zero_std_groups),
                   max_resample_rounds=int(cfg.algorithm.max_resample_rounds), seed=int(cfg.seed),
                   max_tokens_per_micro_batch=int(hw.max_tokens_per_micro_batch),
                   layout=RowLayout.choose(int(hw.max_tokens_per_micro_batch), bool(hw.gradient_checkpointing),
                                           varlen_attention))
        accum = micro_batches_per_update(st, plan.n, world, hw.per_device_batch_size)
        if hw.grad_accum_steps not in (1, accum):
            log.warning("hardware.grad_accum_steps=%d is not used by stage=grpo: an optimizer step is one mini-batch "
                        "of %d prompts x %d samples = %d micro-batches of %d per rank", hw.grad_accum_steps, mini,
                        plan.n, accum, hw.per_device_batch_size)
        return plan

    def describe(self) -> str:
        mini = self.prompts_per_step // self.mini_batches
        accum = math.ceil(mini * self.n / self.world / self.per_device_batch_size)
        micro = (f"micro-batches of at most {self.max_tokens_per_micro_batch} tokens packed into one unpadded row"
                 if self.max_tokens_per_micro_batch > 0 else
                 f"{accum} micro-batch(es) of {self.per_device_batch_size}")
        return (f"{self.total_steps} steps of {self.prompts_per_step} prompts x {self.n} samples; "
                f"{self.ppo_epochs} epoch(s) x {self.mini_batches} mini-batch(es) of {mini} prompts = "
                f"{self.updates_per_step} optimizer step(s) per step, each {micro} x {self.world} process(es); "
                f"rows {self.layout.value}")


# ============================================================================================ rollouts
@dataclass
class GenerationRound:
    """One prompt batch generated and scored on this rank (``L`` prompts x ``n`` samples = ``N`` rows)."""

    batch: RolloutBatch  # N completions, prompt-major
    columns: Dict[str, list]  # the L dataset rows, column -> values
    total: torch.Tensor  # [N] total reward
    per_fn: Dict[str, torch.Tensor]  # reward name -> [N], NaN where the reward returned None
    arrays: Dict[str, np.ndarray]  # per-sample metric arrays of every rank, [world * N] each, rank-major
    zero_std: np.ndarray  # [world, L] bool: the group's rewards are all equal


@dataclass
class Groups:
    samples: List[Sample]  # this rank's kept samples, group-major
    log_arrays: Dict[str, np.ndarray]  # every generated sample of the step, all ranks (for metrics)
    reward_names: List[str]
    num_tokens: int  # prompt + completion tokens generated in the step, all ranks
    rounds: List[GenerationRound] = field(default_factory=list)  # raw generation rounds (for the samples parquet)
    advantages: Dict[GroupKey, torch.Tensor] = field(default_factory=dict)  # a kept group -> its [n] advantages
    rank: int = 0
    n: int = 1
    groups_generated: int = 0  # over every round and rank
    groups_kept: int = 0  # trained: at most prompts_per_step
    frac_zero_std: float = 0.0  # of the generated groups, those whose rewards are all equal (no signal)
    reward_std: float = math.nan  # of the kept groups' rewards
    advantage_abs_mean: float = math.nan

    def sampling_metrics(self) -> Dict[str, float]:
        """What dynamic sampling did, under its logged names."""
        return {"frac_reward_zero_std": self.frac_zero_std, "reward_std": self.reward_std,
                "advantage_abs_mean": self.advantage_abs_mean, "sampling/rounds": float(len(self.rounds)),
                "sampling/groups_generated": float(self.groups_generated),
                "sampling/groups_kept": float(self.groups_kept)}

    def records(self) -> List[Dict[str, Any]]:
        """This rank's rows of the samples parquet: every generated completion, kept or filtered."""
        return sample_records(self.rounds, self.rank, self.n, self.advantages)


def collect_groups(acc, batches: SyncBatches, rewards: RewardRunner, plan: StepPlan, alg,
                   timer: "PhaseTimer") -> Groups:
    """Generate, score and keep groups for one step. With ``filter_zero_std_groups``, groups whose rewards are all
    equal are dropped and further prompt batches are generated (at most ``max_resample_rounds`` more) until
    ``prompts_per_step`` groups are kept; the first ``prompts_per_step`` kept groups (in generation order) are
    trained. Advantages are computed over the kept groups of all ranks."""
    world, rank, n = acc.num_processes, acc.process_index, plan.n
    rounds: List[GenerationRound] = []
    kept_global: List[GroupKey] = []  # in generation order
    for round_idx in range(plan.max_resample_rounds + 1 if plan.filter_groups else 1):
        with timer("generate"):  # asynchronous: the wait for the generator process
            columns, batch = batches.next_round(acc)
        if batch.timing is not None:  # multi-turn: of time/generate, the seconds spent in the env (code runs)
            timer.add("env", batch.timing.env_s)
        with timer("score"):
            result = rewards(batch.texts, **reward_columns(columns, batch))
        total = torch.tensor(result.total, dtype=torch.float32)
        per_fn = {name: torch.tensor([np.nan if v is None else v for v in values], dtype=torch.float32)
                  for name, values in result.per_fn.items()}
        local = per_sample_arrays(batch, total, per_fn)
        local.update({k: torch.tensor(v, dtype=torch.float32) for k, v in result.sample_flags().items()})
        everything = gather_rows(acc, local)  # [world * L * n, K], rank-major
        global_total = everything["reward/total"].reshape(world, -1, n)  # [rank, group, sample]
        zero_std = global_total.max(-1) == global_total.min(-1)  # [rank, group]
        rounds.append(GenerationRound(batch=batch, columns=columns, total=total, per_fn=per_fn, arrays=everything,
                                      zero_std=zero_std))
        for r in range(world):
            for g in range(zero_std.shape[1]):
                if not (plan.filter_groups and zero_std[r, g]):
                    kept_global.append(GroupKey(round_idx, r, g))
        if len(kept_global) >= plan.prompts_per_step:
            break
    kept_global = kept_global[:plan.prompts_per_step]

    # advantages over every kept group of every rank, identical on all ranks
    kept_rewards = torch.stack([torch.from_numpy(rounds[ri].arrays["reward/total"].reshape(world, -1, n)[r, g])
                                for ri, r, g in kept_global]) if kept_global else torch.zeros(0, n)
    if kept_global:
        adv, adv_metrics = group_advantages(kept_rewards.reshape(-1), n, alg.adv_scale)
        adv = adv.reshape(-1, n)
    else:
        adv, adv_metrics = torch.zeros(0, n), {}
    samples: List[Sample] = []
    adv_of: Dict[GroupKey, torch.Tensor] = {}
    for k, (ri, r, g) in enumerate(kept_global):
        adv_of[GroupKey(ri, r, g)] = adv[k]
        if r != rank:
            continue
        batch = rounds[ri].batch
        for j in range(g * n, (g + 1) * n):
            samples.append(Sample(
                prompt_ids=batch.prompt_ids[j], completion_ids=batch.completion_ids[j],
                advantage=float(adv[k][j - g * n]),
                trained=not (alg.mask_truncated and batch.truncated[j]),
                rollout_logprobs=batch.logprobs[j] if batch.logprobs is not None else None,
                loss_mask=batch.loss_mask[j] if batch.loss_mask is not None else None))

    arrays = {k: np.concatenate([rd.arrays[k] for rd in rounds]) for k in rounds[0].arrays}
    zero_std_all = np.concatenate([rd.zero_std.reshape(-1) for rd in rounds])
    num_tokens = int(arrays["prompt_tokens"].sum() + arrays["completion_tokens"].sum())
    return Groups(samples=samples, log_arrays=arrays, reward_names=list(rewards.names), num_tokens=num_tokens,
                  rounds=rounds, advantages=adv_of, rank=rank, n=n, groups_generated=int(zero_std_all.size),
                  groups_kept=len(kept_global), frac_zero_std=float(zero_std_all.mean()),
                  reward_std=float(adv_metrics.get("reward_std", math.nan)),
                  advantage_abs_mean=float(adv_metrics.get("advantage_abs_mean", math.nan)))


def gather_rows(acc, arrays: Dict[str, torch.Tensor]) -> Dict[str, np.ndarray]:
    """Concatenate every rank's per-sample arrays (rank-major), as numpy."""
    keys = list(arrays)
    stacked = torch.stack([arrays[k] for k in keys], dim=1).to(acc.device)
    if acc.num_processes > 1:
        stacked = acc.gather(stacked)
    stacked = stacked.cpu().numpy()
    return {k: stacked[:, i] for i, k in enumerate(keys)}


# ============================================================================================ batches
def make_mini_batches(ctx: StepContext, samples: List[Sample], plan: StepPlan, acc) -> List[List[MicroBatch]]:
    """Split this rank's kept samples (group-major) into ``mini_batches`` optimizer steps of whole groups, each
    into micro-batches of ``per_device_batch_size`` rows, or of at most ``hardware.max_tokens_per_micro_batch``
    tokens packed into one row when that is set. Every rank gets the same number of micro-batches per
    mini-batch (short ranks are padded with dummy micro-batches that train nothing)."""
    n = plan.n
    groups = [samples[i:i + n] for i in range(0, len(samples), n)]
    total_groups = int(sum_over_ranks(acc, len(groups)))
    num_minis = min(plan.mini_batches, total_groups)
    chunks = [list(c) for c in np.array_split(np.arange(len(groups)), num_minis)] if num_minis else []
    pad_id = ctx.tokenizer.pad_token_id
    filler = samples[:1] or ctx.filler
    if samples:
        ctx.filler = samples[:1]
    minis = []
    for chunk in chunks:
        rows = [s for g in chunk for s in groups[g]]
        budget = plan.max_tokens_per_micro_batch
        costs = [len(s.prompt_ids) + len(s.completion_ids) for s in rows]
        # a packed row lays a group's prompt down once: a completion after its group's previous one costs only itself
        after = [len(s.completion_ids) if i and rows[i - 1].prompt_ids == s.prompt_ids else costs[i]
                 for i, s in enumerate(rows)] if plan.layout is RowLayout.PACKED_SHARED_PREFIX else None
        parts = micro_batch_parts(costs, plan.per_device_batch_size, budget, after)
        micro = [collate([rows[i] for i in part], pad_id, acc.device, plan.layout) for part in parts]
        needed = max(forwards_per_rank(acc, len(micro)))
        while len(micro) < needed:
            if not filler:
                raise RuntimeError("a rank has no sample at all to build a dummy micro-batch from")
            micro.append(collate(filler, pad_id, acc.device, plan.layout, dummy=True))
        minis.append(micro)
    return minis


# ============================================================================================ evaluation
@torch.no_grad()
def evaluate(acc, rollout, eval_ds, rewards: RewardRunner, cfg: TrainConfig) -> Dict[str, float]:
    """Held-out metrics from `stagewise.evaluation` (the code ``stage=eval`` runs): by default one greedy completion
    per prompt of the first ``stage.num_eval_prompts`` (0 = all); ``eval/reward/<fn>/mean``, ``eval/accuracy``,
    ``eval/pass@<k>`` (``stage.pass_k``), lengths and format compliance. The same dict on every rank."""
    spec = EvalSpec.from_config(cfg.stage, cfg.rollout)
    metrics, _ = evaluate_prompts(acc, rollout, eval_ds, rewards, spec, show_progress=False)
    return metrics


