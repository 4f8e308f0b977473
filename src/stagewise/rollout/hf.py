"""``rollout=hf``: batched ``transformers`` generate with a KV cache. For CPU, tests and small GPU runs.

Prompts are sorted by length and generated ``rollout.batch_size`` sequences per call (``batch_size // n`` prompts),
left-padded so every prompt ends at the same column. Each distinct prompt is prefilled once and its KV cache is
repeated for its ``n`` samples (``num_return_sequences`` would prefill it ``n`` times: a third of a CPU step with
R1-Zero's long system prompt and n=8).
Stopping is tracked per row by one stopping criterion (stop token ids, vectorised, and ``rollout.stop`` strings),
which records the step at which each row finished: completion lengths are exact even when a stop string spans
several tokens, and a row that reaches ``max_new_tokens`` is ``truncated``. Stop strings are matched on decoded text
(the last few generated tokens of each running row, one batched decode per step), as vLLM does; HF's
``StopStringCriteria`` matches token strings instead and fires on byte-level tokens whose decoded text does not
contain the stop string. ``generate(..., on_finished=...)`` hears of each completion the moment it stops (the agent
loop starts that trajectory's code run while the batch's other rows are still generating).

The model is switched to eval mode for the call (no dropout, and gradient checkpointing, which disables the KV
cache in train mode, is inactive) and restored afterwards. Under DeepSpeed ZeRO-3 the parameters are gathered once
around the call (``gather_zero3``, TRL's ``ds3_gather_for_generation``) instead of once per decoding step.
"""

from __future__ import annotations

import contextlib
from typing import Callable, List, Optional, Sequence

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from stagewise.rollout.base import RolloutBatch, SamplingParams, decode_completions, left_pad, stop_token_ids


class StopStrings:
    """Which rows' generated text now contains a stop string: decodes the last ``window`` generated tokens of the
    running rows (enough for the longest stop string, which spans at most one token per character, plus one)."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.window = max(len(s) for s in self.stop) + 1

    def __call__(self, generated: torch.Tensor, running: torch.Tensor) -> torch.Tensor:
        done = torch.zeros(generated.shape[0], dtype=torch.bool, device=generated.device)
        rows = running.nonzero().flatten().tolist()
        if not rows or generated.shape[1] == 0:
            return done
        tails = generated[rows, -self.window:].tolist()
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        hits = [r for r, t in zip(rows, texts) if any(s in t for s in self.stop)]
        if hits:
            done[hits] = True
        return done


class FinishTracker(StoppingCriteria):
    """Stops a row at a stop token id or a stop string and remembers after how many new tokens it stopped
    (``finished_at``; -1 = still running, i.e. truncated if generation ends)."""

    def __init__(self, prompt_width: int, rows: int, stop_ids: Sequence[int], strings: Optional[StopStrings],
                 device, on_finished: Optional[Callable[[int, List[int]], None]] = None):
        self.prompt_width = prompt_width
        self.stop_ids = torch.tensor(list(stop_ids), dtype=torch.long, device=device) if stop_ids else None
        self.strings = strings
        self.finished_at = torch.full((rows,), -1, dtype=torch.long, device=device)
        self.on_finished = on_finished  # (row, its completion's token ids), once, at the step the row stops

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if self.stop_ids is not None:
            done |= torch.isin(input_ids[:, -1], self.stop_ids)
        if self.strings is not None:
            done |= self.strings(input_ids[:, self.prompt_width:], (self.finished_at < 0) & ~done)
        fresh = done & (self.finished_at < 0)
        self.finished_at = torch.where(fresh, torch.full_like(self.finished_at, input_ids.shape[1] - self.prompt_width),
                                       self.finished_at)
        if self.on_finished is not None and bool(fresh.any()):
            for row in fresh.nonzero().flatten().tolist():
                self.on_finished(row, input_ids[row, self.prompt_width:].tolist())
        return self.finished_at >= 0


class HFRollout:
    """Generate with the training model itself. ``model`` is the unwrapped (PEFT or plain) causal LM."""

    reports_finished_rows = True  # generate(..., on_finished=...): see the module docstring

    def __init__(self, model, tokenizer, sampling: SamplingParams, batch_size: int = 64,
                 return_logprobs: bool = False, gather_zero3: bool = False):
        if batch_size < 1:
            raise ValueError(f"rollout.batch_size={batch_size!r} must be >= 1")
        self.model = model
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.batch_size = batch_size
        self.return_logprobs = return_logprobs
        self.gather_zero3 = gather_zero3
        self.stop_ids = stop_token_ids(tokenizer, model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]

    # The colocated vLLM engine needs these; for HF the policy *is* the generator.
    def sync_weights(self, policy=None) -> None:
        """Nothing to push: HF generation runs on the training weights."""

    def staying_awake(self):
        """Nothing sleeps."""
        return contextlib.nullcontext()

    def close(self) -> None:
        """Nothing to release."""

    def generation_config(self, sampling: SamplingParams) -> GenerationConfig:
        greedy = sampling.temperature == 0
        want_lp = self._wants_logprobs(sampling)
        return GenerationConfig(
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None if greedy else sampling.top_k,
            max_new_tokens=sampling.max_new_tokens,
            num_return_sequences=sampling.n,
            eos_token_id=None if sampling.ignore_eos else self.stop_ids,
            pad_token_id=self.pad_id,
            use_cache=True,
            bos_token_id=None,
            return_dict_in_generate=True,
            output_logits=want_lp,
        )

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], sampling: Optional[SamplingParams] = None, *,
                 on_finished: Optional[Callable[[int, List[int]], None]] = None) -> RolloutBatch:
        """``n`` completions for each prompt (token ids), prompt-major. ``on_finished(index, completion_ids)`` is
        called during generation, once per completion that ends at a stop token or stop string (not for one cut at
        ``max_new_tokens``), with its final token ids and its index in the returned batch."""
        sampling = sampling or self.sampling
        if not prompts:
            raise ValueError("generate() got no prompts")
        strings = StopStrings(self.tokenizer, sampling.stop) if any(sampling.stop) else None
        per_call = max(1, self.batch_size // sampling.n)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: List[Optional[tuple]] = [None] * len(prompts)
        was_training = self.model.training
        self.model.eval()
        try:
            with self._gathered():
                for start in range(0, len(order), per_call):
                    chunk = order[start:start + per_call]
                    report = None if on_finished is None else (  # row r of the chunk: prompt r // n, sample r % n
                        lambda r, ids, chunk=chunk: on_finished(chunk[r // sampling.n] * sampling.n + r % sampling.n,
                                                                ids))
                    rows = self._generate_chunk([prompts[i] for i in chunk], sampling, strings, report)
                    for j, i in enumerate(chunk):
                        results[i] = tuple(r[j * sampling.n:(j + 1) * sampling.n] for r in rows)
        finally:
            self.model.train(was_training)
        completion_ids = [c for r in results for c in r[0]]
        truncated = [t for r in results for t in r[1]]
        logprobs = [lp for r in results for lp in r[2]] if self._wants_logprobs(sampling) else None
        return RolloutBatch(
            prompt_ids=[list(prompts[k]) for k in range(len(prompts)) for _ in range(sampling.n)],
            completion_ids=completion_ids,
            texts=decode_completions(self.tokenizer, completion_ids, self.stop_ids + [self.pad_id]),
            truncated=truncated,
            logprobs=logprobs,
            n=sampling.n,
        )

    def _wants_logprobs(self, sampling: SamplingParams) -> bool:
        return self.return_logprobs and sampling.temperature > 0

    def _generate_chunk(self, prompts, sampling: SamplingParams, strings, on_finished=None):
        device = next(self.model.parameters()).device
        input_ids, attention_mask = left_pad(prompts, self.pad_id, device)
        width, n = input_ids.shape[1], sampling.n
        cache = self._shared_prefix_cache(input_ids, attention_mask, n) if n > 1 and width > 1 else None
        if cache is not None:  # the n samples of a prompt share its KV cache; generate() only runs the last token
            input_ids, attention_mask = input_ids.repeat_interleave(n, 0), attention_mask.repeat_interleave(n, 0)
        tracker = FinishTracker(width, len(prompts) * n, [] if sampling.ignore_eos else self.stop_ids,
                                strings, device, on_finished)
        want_lp = self._wants_logprobs(sampling)
        config = self.generation_config(sampling)
        if cache is not None:
            config.num_return_sequences = 1
        out = self.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=config, past_key_values=cache,
            stopping_criteria=StoppingCriteriaList([tracker]))
        new = out.sequences[:, width:]
        steps = new.shape[1]
        done = tracker.finished_at
        lengths = torch.where(done >= 0, done, torch.full_like(done, steps))
        truncated = (tracker.finished_at < 0).tolist()
        lengths = lengths.tolist()
        new_list = new.tolist()
        completion_ids = [row[:n] for row, n in zip(new_list, lengths)]
        logprobs: List[List[float]] = [[] for _ in completion_ids]
        if want_lp:
            lp = torch.stack([
                torch.log_softmax(step_logits.float() / sampling.temperature, dim=-1).gather(
                    -1, new[:, s:s + 1]).squeeze(-1)
                for s, step_logits in enumerate(out.logits)], dim=1)
            logprobs = [row[:n] for row, n in zip(lp.tolist(), lengths)]
        return completion_ids, truncated, logprobs

    def _shared_prefix_cache(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int):
        """Prefill each distinct prompt once (all but its last token) and repeat the KV cache ``n`` times: HF's
        ``num_return_sequences`` would prefill every prompt ``n`` times. Position ids follow generate()'s rule."""
        from transformers import DynamicCache

        position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        cache = DynamicCache(config=getattr(self.model, "config", None))
        self.model(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1],
                   position_ids=position_ids[:, :-1], past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache.batch_repeat_interleave(n)
        return cache

    def _gathered(self):
        if not self.gather_zero3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.model.parameters()))
