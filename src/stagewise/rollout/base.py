"""What every generation backend shares: sampling settings, the batch it returns, and completion post-processing.

A backend takes prompts as token ids and returns, for each prompt, ``n`` completions laid out prompt-major (rows
``[k * n, (k + 1) * n)`` belong to prompt ``k``, the layout `stagewise.algorithms.group_advantages` expects).

Completion conventions (the same for every backend, so a run can switch ``rollout.backend`` without changing what
is trained or scored):

* ``completion_ids`` end with the token that stopped generation: the EOS token (trained, so the policy learns to
  stop) or the last token of a stop string (vLLM's ``include_stop_str_in_output=True``). A completion that hit
  ``max_new_tokens`` is ``truncated``.
* ``texts`` are decoded without the stop token ids (EOS, pad) but with every other added token, so tags such as
  ``<think>`` or ``</answer>`` reach the reward even when a tokenizer marks them special. A stop string stays in
  the text: a format reward that looks for ``</answer>`` must see it.
* ``logprobs`` (optional) are the engine's own log-probs of the sampled tokens, from ``softmax(logits /
  temperature)`` with no top-p/top-k renormalisation, as the trainer computes them (TRL does the same); they feed
  the truncated-importance-sampling correction when the engine is not the trainer (vLLM).

Every backend, and the multi-turn agent loop that wraps one, is a `Generator`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ContextManager, Dict, List, Optional, Protocol, Sequence, runtime_checkable

import torch


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings of one backend; built from ``rollout.*`` by `sampling_from_config`."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 256
    stop: tuple = ()
    # Benchmarks only: generate exactly max_new_tokens (vLLM's ignore_eos).
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        check_sampling(self.n, self.temperature, self.top_p, self.top_k, self.max_new_tokens)


def check_sampling(n: int, temperature: float, top_p: float, top_k: int, max_new_tokens: int) -> None:
    """Refuse settings that cannot give a GRPO group. Temperature 0 is greedy decoding: all ``n`` samples of a prompt
    are identical, every group has zero reward variance and zero advantage, and nothing is learned (the bug in
    DeepAnalyze's released RL script). Errors name the ``rollout.*`` key."""
    if n < 1:
        raise ValueError(f"rollout.n={n!r} must be >= 1")
    if temperature < 0:
        raise ValueError(f"rollout.temperature={temperature!r} must be >= 0")
    if temperature == 0 and n > 1:
        raise ValueError(
            f"rollout.temperature=0 (greedy) with rollout.n={n} gives {n} identical completions per prompt: every "
            f"group has zero reward variance, so every advantage is 0 and GRPO learns nothing. Use a sampling "
            f"temperature (e.g. rollout.temperature=1.0) or rollout.n=1 for evaluation.")
    if not 0 < top_p <= 1:
        raise ValueError(f"rollout.top_p={top_p!r} must be in (0, 1]")
    if top_k < 0:
        raise ValueError(f"rollout.top_k={top_k!r} must be >= 0 (0 = off)")
    if max_new_tokens < 1:
        raise ValueError(f"rollout.max_new_tokens={max_new_tokens!r} must be >= 1")


def sampling_from_config(rollout_cfg, n: Optional[int] = None) -> SamplingParams:
    """``rollout.*`` -> `SamplingParams` (``n`` overrides ``rollout.n``, e.g. 1 for evaluation)."""
    return SamplingParams(
        n=rollout_cfg.n if n is None else n,
        temperature=float(rollout_cfg.temperature),
        top_p=float(rollout_cfg.top_p),
        top_k=int(rollout_cfg.top_k),
        max_new_tokens=int(rollout_cfg.max_new_tokens),
        stop=tuple(rollout_cfg.stop),
    )


@dataclass(frozen=True)
class RolloutTiming:
    """Where the multi-turn loop's time went in one ``generate`` call."""

    generate_s: float  # seconds with generation running (lockstep: in generate calls; streaming: a turn in flight)
    env_s: float  # seconds generation stood still waiting for code runs (lockstep: after each generate call)
    turns: int  # generation calls: one per turn of the batch (lockstep) or one per trajectory turn (streaming)


@dataclass
class RolloutBatch:
    """``N = len(prompts) * n`` completions, prompt-major. ``prompt_ids[i]`` is the prompt of row ``i``.

    The multi-turn loop (`stagewise.rollout.multiturn`) also fills ``loss_mask``, ``env_columns`` and ``timing``;
    a single-turn backend leaves them empty."""

    prompt_ids: List[List[int]]
    completion_ids: List[List[int]]
    texts: List[str]
    truncated: List[bool]
    logprobs: Optional[List[List[float]]] = None  # engine log-probs per completion token, or None
    n: int = 1
    loss_mask: Optional[List[List[int]]] = None  # per completion token: 1 = policy token, 0 = env token; None = all 1
    # per-trajectory env facts, one value per row: turns, code_calls, code_errors, code_timeouts, answered,
    # finish_reason (the rewards get them as columns)
    env_columns: Dict[str, list] = field(default_factory=dict)
    timing: Optional[RolloutTiming] = None

    def __len__(self) -> int:
        return len(self.completion_ids)

    def __post_init__(self) -> None:
        rows = len(self.completion_ids)
        for name in ("prompt_ids", "texts", "truncated"):
            if len(getattr(self, name)) != rows:
                raise ValueError(f"RolloutBatch.{name} has {len(getattr(self, name))} rows, completion_ids {rows}")
        if self.loss_mask is not None:
            for i, (ids, mask) in enumerate(zip(self.completion_ids, self.loss_mask)):
                if len(ids) != len(mask):
                    raise ValueError(f"row {i}: {len(ids)} completion tokens but {len(mask)} loss-mask entries")
        for name, values in self.env_columns.items():
            if len(values) != rows:
                raise ValueError(f"RolloutBatch.env_columns[{name!r}] has {len(values)} rows, completion_ids {rows}")
        if self.logprobs is not None:
            for i, (ids, lp) in enumerate(zip(self.completion_ids, self.logprobs)):
                if len(ids) != len(lp):
                    raise ValueError(f"row {i}: {len(ids)} completion tokens but {len(lp)} engine log-probs")

    @staticmethod
    def concat(batches: Sequence["RolloutBatch"]) -> "RolloutBatch":
        if not batches:
            raise ValueError("nothing to concatenate")
        with_lp = all(b.logprobs is not None for b in batches)
        with_mask = all(b.loss_mask is not None for b in batches)
        env_names = [k for k in batches[0].env_columns if all(k in b.env_columns for b in batches)]
        return RolloutBatch(
            prompt_ids=[p for b in batches for p in b.prompt_ids],
            completion_ids=[c for b in batches for c in b.completion_ids],
            texts=[t for b in batches for t in b.texts],
            truncated=[t for b in batches for t in b.truncated],
            logprobs=[lp for b in batches for lp in b.logprobs] if with_lp else None,
            n=batches[0].n,
            loss_mask=[m for b in batches for m in b.loss_mask] if with_mask else None,
            env_columns={k: [v for b in batches for v in b.env_columns[k]] for k in env_names},
        )

    def select(self, rows: Sequence[int]) -> "RolloutBatch":
        rows = list(rows)
        return RolloutBatch(
            prompt_ids=[self.prompt_ids[i] for i in rows],
            completion_ids=[self.completion_ids[i] for i in rows],
            texts=[self.texts[i] for i in rows],
            truncated=[self.truncated[i] for i in rows],
            logprobs=[self.logprobs[i] for i in rows] if self.logprobs is not None else None,
            n=self.n,
            loss_mask=[self.loss_mask[i] for i in rows] if self.loss_mask is not None else None,
            env_columns={k: [v[i] for i in rows] for k, v in self.env_columns.items()},
        )


@runtime_checkable
class Generator(Protocol):
    """What GRPO, evaluation and rejection sampling generate with: a backend (`stagewise.rollout.hf.HFRollout`,
    `stagewise.rollout.vllm.VLLMColocated`, `stagewise.rollout.vllm.VLLMServerClient`) or the multi-turn loop
    over one (`stagewise.rollout.multiturn.MultiTurnRollout`, whose ``generate`` also takes ``tasks=``)."""

    sampling: SamplingParams  # used when ``generate`` gets no ``sampling``

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Optional[SamplingParams] = None
                 ) -> RolloutBatch:
        """``sampling.n`` completions per prompt (token ids), prompt-major."""
        ...

    def sync_weights(self, policy=None) -> None:
        """Make generation use the policy's current weights (a no-op where the policy generates itself)."""
        ...

    def staying_awake(self) -> ContextManager[None]:
        """Several ``generate`` calls that form one generation (the turns of a multi-turn batch): an engine that
        sleeps between generations (colocated vLLM) stays awake until the block ends, so it keeps its weights and
        prefix cache across the calls and takes no weight push between them; a no-op elsewhere."""
        ...

    def close(self) -> None:
        """Release the engine (processes, GPU memory, sandboxes)."""
        ...


def stop_token_ids(tokenizer, model=None) -> List[int]:
    """Token ids that end a completion: the tokenizer's EOS plus the model's generation-config EOS ids (Qwen
    instruct models list both ``<|im_end|>`` and ``<|endoftext|>``)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None) if model is not None else None
    eos = getattr(gen, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos is not None:
        ids.update(int(e) for e in eos)
    return sorted(ids)


def decode_completions(tokenizer, completion_ids: Sequence[Sequence[int]], drop_ids: Sequence[int]) -> List[str]:
    """Decode without the ids in ``drop_ids`` (EOS/pad) and keep every other token, special or not."""
    drop = set(int(i) for i in drop_ids)
    cleaned = [[t for t in ids if t not in drop] for ids in completion_ids]
    return tokenizer.batch_decode(cleaned, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device=None):
    """``(input_ids [B, P], attention_mask [B, P])`` with prompts right-aligned (left padding)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)
