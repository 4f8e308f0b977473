"""Micro-batching, the one home for both training stages (SFT and GRPO).

An optimizer step trains a fixed set of rows per rank. This module decides how they are cut into forwards, keeps the
ranks in step, and takes the guarded optimizer step:

* `micro_batch_parts`: row positions -> micro-batches of ``per_device_batch_size`` rows or, with a token budget
  (``hardware.max_tokens_per_micro_batch`` > 0), consecutive runs of at most that many tokens (verl's dynamic batch
  size, OpenRLHF's packing budget). Order is kept, so the step trains the same rows whatever the split. A row's cost
  can depend on the row before it in the same micro-batch: GRPO's packed rows lay a group's shared prompt down once,
  so a completion after its group's previous one costs only its own tokens.
* `forwards_per_rank`: every rank's micro-batch count. Every rank runs as many forwards as the busiest one (ZeRO-3
  gathers parameters and reduces gradients at every forward/backward, so a rank that runs fewer hangs the others);
  the extra ones train nothing (SFT repeats a micro-batch at weight 0, GRPO runs a dummy with an all-zero mask).
* `guarded_optimizer_step`: the NaN guard's decision on the step's reduced loss, then clip + step, or a skipped
  update (DeepSpeed has already stepped inside the boundary backward, so it always counts as taken).
* `sum_over_ranks`: a scalar summed over the ranks (loss normalisers, group counts).
* `Sample` / `MicroBatch` / `collate`: GRPO's rows (a prompt and one completion) and the micro-batch the loss reads,
  padded, or packed into one unpadded row (`stagewise.training.modeling.pack_rows`), as the stage's `RowLayout`
  says (chosen once: packed or padded, each group's shared prompt run once or per row). SFT's rows are chat
  documents collated by `stagewise.data.SFTCollator`.
What accumulates between two log lines is `stagewise.tracking.window.Window`, for both stages too.

Each micro-batch loss is normalised by the whole step's normaliser (trained tokens or sequences over every
micro-batch and rank, `stagewise.algorithms`), so any split gives the one-big-batch update.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from stagewise.tracking.alerts import UPDATE, NanGuard
from stagewise.training.accelerator import optimizer_step, uses_deepspeed
from stagewise.training.modeling import PackedRows, pack_rows


def split_by_budget(costs: Sequence[int], max_tokens: int,
                    costs_after_previous: Optional[Sequence[int]] = None) -> List[List[int]]:
    """Positions ``0..len(costs)-1`` -> consecutive runs whose costs add up to at most ``max_tokens`` (a row costing
    more goes alone). ``costs_after_previous[i]``: row i's cost when row i-1 is in the same run (default: the same
    as ``costs[i]``); a run's first row always costs ``costs[i]``."""
    after = costs if costs_after_previous is None else costs_after_previous
    parts: List[List[int]] = []
    used = 0
    for i, full in enumerate(costs):
        cost = after[i] if parts else full
        if not parts or used + cost > max_tokens:
            parts.append([])
            used, cost = 0, full
        parts[-1].append(i)
        used += cost
    return parts


def micro_batch_parts(costs: Sequence[int], per_device: int, max_tokens: int,
                      costs_after_previous: Optional[Sequence[int]] = None) -> List[List[int]]:
    """A rank's rows of one optimizer step (their token ``costs``) -> micro-batches of row positions:
    ``per_device`` rows each, or with a token budget (``max_tokens`` > 0) `split_by_budget`."""
    if max_tokens > 0:
        return split_by_budget(costs, max_tokens, costs_after_previous)
    return [list(range(i, min(i + per_device, len(costs)))) for i in range(0, len(costs), per_device)]


def forwards_per_rank(acc, count: int) -> List[int]:
    """Every rank's micro-batch count this step (``[count]`` on one process). Each rank runs ``max()`` forwards."""
    if acc.num_processes == 1:
        return [count]
    return [int(c) for c in acc.gather(torch.tensor([count], device=acc.device)).tolist()]


def sum_over_ranks(acc, value: float) -> float:
    """``value`` summed over the ranks (``value`` itself on one process)."""
    if acc.num_processes == 1:
        return value
    return float(acc.reduce(torch.tensor(float(value), device=acc.device), reduction="sum"))


def guarded_optimizer_step(acc, model, optimizer, scheduler, max_grad_norm: float, nan_guard: NanGuard,
                           loss: float) -> Tuple[str, Optional[float]]:
    """The NaN guard's action for this step's ``loss`` (the same reduced value on every rank) and the pre-clip
    gradient norm of the update taken, or None when a non-finite loss skipped it (gradients dropped). Under
    DeepSpeed the engine stepped inside the boundary backward, so the update always counts as taken."""
    action = nan_guard.observe(loss)
    if action == UPDATE or uses_deepspeed(acc):
        return action, optimizer_step(acc, model, optimizer, scheduler, max_grad_norm)
    optimizer.zero_grad(set_to_none=True)
    return action, None


# ============================================================================ prompt + completion rows (GRPO)
@dataclass
class Sample:
    """One completion to train on."""

    prompt_ids: List[int]
    completion_ids: List[int]
    advantage: float
    trained: bool  # False: truncated and algorithm.mask_truncated
    rollout_logprobs: Optional[List[float]] = None
    loss_mask: Optional[List[int]] = None  # multi-turn: 1 = policy token, 0 = env token (no loss); None = all 1


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [B, P + T]: left-padded prompts then right-padded completions
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    prompt_width: int
    targets: torch.Tensor  # [B, T] completion ids, -1 at padding
    tokens: torch.Tensor  # [B, T] bool: real completion tokens
    mask: torch.Tensor  # [B, T] bool: trained tokens
    advantages: torch.Tensor  # [B]
    prompt_index: Optional[torch.Tensor] = None  # [B]: which distinct prompt (of `unique_rows`) each row has
    unique_rows: Optional[torch.Tensor] = None  # [U]: the first row of each distinct prompt (set: run each once)
    rollout_logprobs: Optional[torch.Tensor] = None  # [B, T] engine log-probs (vLLM), for TIS
    old_logprobs: Optional[torch.Tensor] = None
    ref_logprobs: Optional[torch.Tensor] = None
    packed: Optional[PackedRows] = None  # hardware.max_tokens_per_micro_batch > 0: what the model runs on


class RowLayout(enum.Enum):
    """What the model runs a GRPO micro-batch on, chosen once per stage (`RowLayout.choose`) and carried by each
    `MicroBatch` (``packed``, ``unique_rows``), so the log-prob code reads the batch, not a flag."""

    PADDED = "padded"  # left-padded prompts + right-padded completions, every row runs its own prompt
    PADDED_SHARED_PREFIX = "padded, shared prefix"  # each distinct prompt runs once, its KV cache indexed out
    PACKED = "packed"  # one unpadded row of prompt + completion sequences (`pack_rows`)
    PACKED_SHARED_PREFIX = "packed, shared prefix"  # one unpadded row, each group's prompt laid down once

    @classmethod
    def choose(cls, max_tokens_per_micro_batch: int, gradient_checkpointing: bool,
               varlen_attention: bool) -> "RowLayout":
        """Packed when a token budget is set (``hardware.max_tokens_per_micro_batch`` > 0); the shared prompt runs
        once where it can: in a packed row with ``sdpa_varlen`` attention (which attends a group's completions to
        their one prompt), in padded rows unless gradient checkpointing drops the KV cache the completions read."""
        if max_tokens_per_micro_batch > 0:
            return cls.PACKED_SHARED_PREFIX if varlen_attention else cls.PACKED
        return cls.PADDED if gradient_checkpointing else cls.PADDED_SHARED_PREFIX

    @property
    def packed(self) -> bool:
        return self in (RowLayout.PACKED, RowLayout.PACKED_SHARED_PREFIX)

    @property
    def shares_prefix(self) -> bool:
        return self in (RowLayout.PADDED_SHARED_PREFIX, RowLayout.PACKED_SHARED_PREFIX)


def collate(samples: Sequence[Sample], pad_id: int, device, layout: RowLayout = RowLayout.PADDED,
            dummy: bool = False) -> MicroBatch:
    """One micro-batch laid out as ``layout`` says. The per-token tensors the loss reads (targets, masks, log-probs)
    are always ``[B, T]``; a packed layout adds the unpadded row the model runs on instead of the padded
    ``input_ids`` (`pack_rows`); a shared prefix sets ``unique_rows`` / ``prompt_index`` (padded) or lays each
    group's prompt down once in the packed row.
    ``dummy`` keeps the shapes but trains nothing (a rank with fewer micro-batches than the others runs these so
    every rank calls forward/backward the same number of times)."""
    b = len(samples)
    pw = max(len(s.prompt_ids) for s in samples)
    tw = max(1, max(len(s.completion_ids) for s in samples))
    ids = torch.full((b, pw + tw), pad_id, dtype=torch.long)
    attn = torch.zeros((b, pw + tw), dtype=torch.long)
    targets = torch.full((b, tw), -1, dtype=torch.long)
    with_lp = all(s.rollout_logprobs is not None for s in samples)
    rollout_lp = torch.zeros((b, tw), dtype=torch.float32) if with_lp else None
    policy_token = torch.ones((b, tw), dtype=torch.bool)  # multi-turn: False on env (Execute) tokens
    for i, s in enumerate(samples):
        p, c = len(s.prompt_ids), len(s.completion_ids)
        ids[i, pw - p:pw] = torch.tensor(s.prompt_ids, dtype=torch.long)
        ids[i, pw:pw + c] = torch.tensor(s.completion_ids, dtype=torch.long)
        attn[i, pw - p:pw + c] = 1
        targets[i, :c] = ids[i, pw:pw + c]
        if with_lp:
            rollout_lp[i, :c] = torch.tensor(s.rollout_logprobs, dtype=torch.float32)
        if s.loss_mask is not None:
            policy_token[i, :c] = torch.tensor(s.loss_mask, dtype=torch.bool)
    tokens = targets >= 0
    trained = torch.tensor([s.trained and not dummy for s in samples], dtype=torch.bool)
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
    first: Dict[tuple, int] = {}
    prompt_index = [first.setdefault(tuple(s.prompt_ids), len(first)) for s in samples]
    unique_rows = [prompt_index.index(u) for u in range(len(first))]
    share_padded = layout is RowLayout.PADDED_SHARED_PREFIX and len(unique_rows) < b  # else nothing to share
    return MicroBatch(
        prompt_index=torch.tensor(prompt_index, dtype=torch.long, device=device) if share_padded else None,
        unique_rows=torch.tensor(unique_rows, dtype=torch.long, device=device) if share_padded else None,
        input_ids=ids.to(device), attention_mask=attn.to(device), position_ids=position_ids.to(device),
        prompt_width=pw, targets=targets.to(device), tokens=tokens.to(device),
        mask=(tokens & trained[:, None] & policy_token).to(device),
        advantages=torch.tensor([s.advantage for s in samples], dtype=torch.float32, device=device),
        rollout_logprobs=rollout_lp.to(device) if rollout_lp is not None else None,
        packed=(pack_rows([(s.prompt_ids, s.completion_ids) for s in samples], device,
                          share_prefix=layout.shares_prefix) if layout.packed else None))
