"""Generative evaluation: generate on a prompt dataset, score with the rewards, report mean reward and pass@k.

    spec = EvalSpec.from_config(cfg.stage, cfg.rollout)   # stage.pass_k, stage.eval_num_samples, rollout.*
    metrics, records = evaluate_prompts(acc, rollout, prompts, rewards, spec)
    gen_eval = GenerativeEval.from_config(cfg, acc, policy, tokenizer)   # SFT: held-out prompts of `data`
    metrics = gen_eval()                                     # every `stage.eval_steps`

Used by ``stage=eval`` (any checkpoint), by GRPO's held-out evaluation and by SFT when a reward is configured.

Sampling. With ``stage.pass_k == [1]`` (the default) each prompt gets one greedy completion: ``eval/accuracy`` is
greedy accuracy, the number people quote. When a ``k > 1`` is asked for, each prompt gets
``stage.eval_num_samples`` completions (0 = ``max(pass_k)``) sampled at ``rollout.temperature`` / ``rollout.top_p``,
and pass@k uses the unbiased estimator of Chen et al. (2021), not "any of the first k samples" (which has a higher
variance for the same n).

Correctness. A completion is correct when its *score* is at least ``stage.acceptance_threshold`` (0.8), the same rule
rejection sampling accepts with (`acceptance_scores`): the score is the reward function ``stage.score_reward`` when
set, else the weighted total divided by the sum of the weights, i.e. the weighted mean, which lies in [0, 1] whenever
every reward does, so one threshold means the same thing for any reward preset. A function that cannot score a
sample (None) counts as 0 in that mean: an unverifiable answer is never "correct".

Metrics (identical on every rank, so early-stopping decisions agree): ``eval/accuracy`` (mean correctness over all
samples = the unbiased pass@1), ``eval/pass@<k>``, ``eval/reward/total/mean`` and ``eval/reward/<fn>/mean`` (the
weighted sum and each function, as GRPO logs them in training), ``eval/completions/mean_length`` (tokens),
``eval/completions/clipped_ratio``, ``eval/quality/format_compliance``, ``eval/num_prompts``,
``eval/samples_per_prompt``, and ``eval/<source>/accuracy`` when the prompts come from several sources.

Distributed: every rank takes a strided share of the prompts, padded so all ranks make the same number of
``generate`` calls (ZeRO-3 gathers parameters collectively inside each call); numbers are gathered to every rank.

Multi-turn (``env.name != single_turn``, e.g. ``code_sandbox``): `stagewise.rollout.build_generator` wraps the
backend in the agent loop (`stagewise.rollout.multiturn.MultiTurnRollout`); each prompt's dataset row is passed as its
task (workspace files), the loop's per-trajectory facts (``turns``, ``code_calls`` ...) reach the rewards as columns,
and the whole trajectory (with its ``<Execute>`` spans) is the completion that is scored.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from stagewise.config import GenerativeEvalBlock, RolloutConfig, TrainConfig
from stagewise.rollout import SamplingParams, build_generator, generate, reward_columns
from stagewise.tracking import progress
from stagewise.tracking.console import format_indicators

log = logging.getLogger(__name__)


# ============================================================================================ pure rules
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: ``1 - C(n-c, k) / C(n, k)`` (Chen et al.
    2021, eq. 1), computed as a product so that large ``n`` does not overflow."""
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def acceptance_scores(per_fn: Mapping[str, Sequence[Optional[float]]], weights: Mapping[str, float],
                      score_reward: Optional[str] = None) -> List[Optional[float]]:
    """The score each completion is judged by (see the module docstring): ``per_fn[score_reward]`` when given
    (None stays None: not scorable, never accepted), else ``sum(w * r) / sum(w)`` with None counted as 0."""
    if score_reward is not None:
        if score_reward not in per_fn:
            raise KeyError(f"stage.score_reward={score_reward!r} is not one of the configured rewards "
                           f"{sorted(per_fn)} (reward.functions; use the display name: alias or registry name)")
        return [None if v is None else float(v) for v in per_fn[score_reward]]
    if not per_fn:
        raise ValueError("no reward functions to score with: set reward=<preset> or reward.functions")
    total_weight = float(sum(weights[name] for name in per_fn))
    if total_weight <= 0:
        raise ValueError(f"the reward weights sum to {total_weight} (reward.functions); the weighted-mean score "
                         "needs a positive sum: fix the weights or set stage.score_reward=<one function>")
    n = len(next(iter(per_fn.values())))
    return [sum(weights[name] * (values[i] or 0.0) for name, values in per_fn.items()) / total_weight
            for i in range(n)]


def is_correct(score: Optional[float], threshold: float) -> bool:
    """The acceptance rule shared by evaluation and rejection sampling: scored and ``score >= threshold``."""
    return score is not None and not math.isnan(score) and score >= threshold


# ============================================================================================ settings
# Prompts per generate() call for vLLM backends: vLLM schedules its own batches, so big calls keep it busy (the
# progress bar ticks once per call). The hf backend takes ``rollout.batch_size`` sequences per call.
ENGINE_PROMPTS_PER_CALL = 512


def prompts_per_call(rollout_cfg, n: int) -> int:
    if rollout_cfg.backend == "hf":
        return max(1, int(rollout_cfg.batch_size) // n)
    return ENGINE_PROMPTS_PER_CALL


@dataclass(frozen=True)
class EvalSpec:
    pass_k: tuple = (1,)
    num_samples: int = 1  # completions per prompt
    temperature: float = 0.0  # 0 = greedy (only with num_samples == 1)
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop: tuple = ()
    threshold: float = 0.8
    score_reward: Optional[str] = None
    num_prompts: int = 0  # 0 = all
    prompts_per_call: int = 64

    def sampling(self) -> SamplingParams:
        return SamplingParams(n=self.num_samples, temperature=self.temperature, top_p=self.top_p,
                              max_new_tokens=self.max_new_tokens, stop=self.stop)

    @classmethod
    def from_config(cls, st: GenerativeEvalBlock, ro: RolloutConfig) -> "EvalSpec":
        """From ``stage.pass_k``, ``stage.eval_num_samples``, ``stage.acceptance_threshold``, ``stage.score_reward``,
        ``stage.num_eval_prompts`` and ``rollout.*``. Errors name the key."""
        ks = tuple(sorted({int(k) for k in st.pass_k}))
        if not ks or ks[0] < 1:
            raise ValueError(f"stage.pass_k={list(st.pass_k)} must be a non-empty list of integers >= 1")
        n = int(st.eval_num_samples) or ks[-1]
        if n < ks[-1]:
            raise ValueError(f"stage.eval_num_samples={n} is smaller than the largest k in stage.pass_k={list(ks)}: "
                             "pass@k needs at least k samples per prompt")
        temperature = float(ro.temperature) if n > 1 else 0.0
        if n > 1 and temperature == 0:
            raise ValueError(f"{n} samples per prompt (stage.pass_k={list(ks)}) at rollout.temperature=0 would all "
                             "be the same greedy completion; set rollout.temperature > 0 (e.g. 0.6)")
        if st.num_eval_prompts < 0:
            raise ValueError(f"stage.num_eval_prompts={st.num_eval_prompts} must be >= 0 (0 = all)")
        return cls(pass_k=ks, num_samples=n, temperature=temperature, top_p=float(ro.top_p) if n > 1 else 1.0,
                   max_new_tokens=int(ro.max_new_tokens), stop=tuple(ro.stop),
                   threshold=float(st.acceptance_threshold), score_reward=st.score_reward,
                   num_prompts=int(st.num_eval_prompts), prompts_per_call=prompts_per_call(ro, n))


# ============================================================================================ generate + score
@dataclass
class PromptResult:
    """One prompt's ``n`` completions, scored. ``texts`` is filled only when asked for (they can be large)."""

    row: int
    source: str
    totals: List[float]
    scores: List[Optional[float]]
    per_fn: Dict[str, List[Optional[float]]]
    lengths: List[int]
    truncated: List[bool]
    format_ok: List[bool]
    texts: List[str] = field(default_factory=list)
    turns: List[int] = field(default_factory=list)

    def correct(self, threshold: float) -> int:
        return sum(is_correct(s, threshold) for s in self.scores)


def rank_share(num_rows: int, rank: int, world: int) -> tuple[List[int], int]:
    """This rank's strided rows, padded (with its first row, or row 0) to the same length on every rank.
    Returns ``(rows, real)``: only the first ``real`` rows count."""
    mine = list(range(rank, num_rows, world))
    width = -(-num_rows // world)
    real = len(mine)
    filler = mine[0] if mine else 0
    return mine + [filler] * (width - real), real


def generate_and_score(acc, rollout, prompts, rows: Sequence[int], rewards, spec: EvalSpec, *,
                       keep_texts: bool = False, desc: str = "eval", show_progress: bool = True,
                       real: Optional[int] = None) -> List[PromptResult]:
    """Generate ``spec.num_samples`` completions for each of ``rows`` of ``prompts`` (this rank's share), score them.
    ``real``: how many of ``rows`` are real (the rest pad the share; they are generated but dropped)."""
    real = len(rows) if real is None else real
    sampling = spec.sampling()
    weights = {e.name: e.weight for e in rewards.entries}
    n = spec.num_samples
    out: List[PromptResult] = []
    bar = progress(total=len(rows) * acc.num_processes, desc=desc,
                   enabled=show_progress and acc.is_main_process)
    for start in range(0, len(rows), spec.prompts_per_call):
        chunk = list(rows[start:start + spec.prompts_per_call])
        columns = prompts[chunk]
        batch = generate(rollout, columns, sampling)
        cols = reward_columns(columns, batch)
        result = rewards(batch.texts, **cols)
        scores = acceptance_scores(result.per_fn, weights, spec.score_reward)
        turns = [int(t) for t in cols.get("turns", [1] * len(batch))]
        for j, row in enumerate(chunk):
            if start + j >= real:
                continue
            s = slice(j * n, (j + 1) * n)
            out.append(PromptResult(
                row=int(row), source=str(columns["source"][j]) if "source" in columns else "data",
                totals=[float(t) for t in result.total[s]], scores=scores[s],
                per_fn={name: list(v[s]) for name, v in result.per_fn.items()},
                lengths=[len(c) for c in batch.completion_ids[s]], truncated=list(batch.truncated[s]),
                format_ok=[format_indicators(t)[0] for t in batch.texts[s]],
                texts=list(batch.texts[s]) if keep_texts else [], turns=turns[s]))
        bar.update(len(chunk) * acc.num_processes)
    bar.close()
    return out


def summarise(results: Sequence[PromptResult], spec: EvalSpec, prefix: str = "eval/") -> Dict[str, float]:
    """The metrics of the module docstring from every rank's results (pure: the same input gives the same dict)."""
    if not results:
        return {}
    nan = float("nan")
    th = spec.threshold
    flat = lambda attr: [v for r in results for v in getattr(r, attr)]  # noqa: E731
    scores, totals = flat("scores"), flat("totals")
    m: Dict[str, float] = {f"{prefix}accuracy": float(np.mean([is_correct(s, th) for s in scores]))}
    for k in spec.pass_k:
        m[f"{prefix}pass@{k}"] = float(np.mean([pass_at_k(len(r.scores), r.correct(th), k) for r in results]))
    m[f"{prefix}reward/total/mean"] = float(np.mean(totals))
    for name in results[0].per_fn:
        scored = [v for r in results for v in r.per_fn[name] if v is not None]
        m[f"{prefix}reward/{name}/mean"] = float(np.mean(scored)) if scored else nan
    m[f"{prefix}completions/mean_length"] = float(np.mean(flat("lengths")))
    m[f"{prefix}completions/clipped_ratio"] = float(np.mean(flat("truncated")))
    m[f"{prefix}quality/format_compliance"] = float(np.mean(flat("format_ok")))
    if any(t != 1 for t in flat("turns")):
        m[f"{prefix}turns/mean"] = float(np.mean(flat("turns")))
    m[f"{prefix}num_prompts"] = float(len(results))
    m[f"{prefix}samples_per_prompt"] = float(spec.num_samples)
    sources = sorted({r.source for r in results})
    if len(sources) > 1:
        for src in sources:
            mine = [is_correct(s, th) for r in results if r.source == src for s in r.scores]
            m[f"{prefix}{src}/accuracy"] = float(np.mean(mine))
    return m


def gather_all(acc, items: list) -> list:
    """Every rank's python objects, on every rank, in rank order."""
    if acc.num_processes == 1:
        return list(items)
    from accelerate.utils import gather_object

    return list(gather_object(items))


def evaluate_prompts(acc, rollout, prompts, rewards, spec: EvalSpec, *, keep_texts: bool = False,
                     desc: str = "eval", show_progress: bool = True):
    """``(metrics, results)`` over the first ``spec.num_prompts`` rows of ``prompts`` (0 = all). ``metrics`` is the
    same on every rank; ``results`` holds every rank's `PromptResult`s on every rank, sorted by row."""
    limit = min(spec.num_prompts or len(prompts), len(prompts))
    rows, real = rank_share(limit, acc.process_index, acc.num_processes)
    mine = generate_and_score(acc, rollout, prompts, rows, rewards, spec, keep_texts=keep_texts, desc=desc,
                              show_progress=show_progress, real=real)
    results = sorted(gather_all(acc, mine), key=lambda r: r.row)
    return summarise(results, spec), results


def results_table(results: Sequence[PromptResult], prompts, threshold: float):
    """One row per completion (the ``samples/step_<N>.parquet`` layout): prompt, completion, rewards, score. The
    columns GRPO's samples also have use the same names (`stagewise.tracking.samples.sample_records`)."""
    import pandas as pd

    records = []
    for r in results:
        prompt = prompts[r.row]["prompt"] if "prompt" in prompts.column_names else ""
        gold = {c: str(prompts[r.row][c]) for c in ("answer", "solution", "target") if c in prompts.column_names}
        for j in range(len(r.scores)):
            records.append({
                "prompt_index": r.row, "sample": j, "source": r.source, "prompt": prompt,
                "completion": r.texts[j] if r.texts else None,
                **{f"reward_{name}": v[j] for name, v in r.per_fn.items()},
                "reward_total": r.totals[j], "score": r.scores[j], "correct": is_correct(r.scores[j], threshold),
                "completion_tokens": r.lengths[j], "truncated": r.truncated[j],
                "turns": r.turns[j] if r.turns else 1, **gold})
    return pd.DataFrame(records)


def inference_config(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` for a stage that only generates (eval, rejection sampling): DeepSpeed off, since nothing is trained;
    every rank holds the whole model and takes a share of the prompts (for a model too large for one device use
    ``rollout=vllm`` with ``rollout.tensor_parallel_size``)."""
    from dataclasses import replace

    return replace(cfg, hardware=replace(cfg.hardware, deepspeed=replace(cfg.hardware.deepspeed, zero_stage=0)))


def generation_setup(cfg):
    """What a generation-only stage (eval, rejection sampling) starts from, seeded with ``cfg.seed``:
    ``(inference_config(cfg), accelerator, run folder, policy in eval mode, tokenizer)``."""
    from stagewise.run_folder import RunFolder
    from stagewise.training import build_accelerator, set_seed

    set_seed(cfg.seed)
    icfg = inference_config(cfg)
    acc = build_accelerator(icfg.hardware)
    model, tokenizer = load_policy(icfg.model, acc)
    return icfg, acc, RunFolder(cfg.run_dir), model, tokenizer


def load_policy(model_cfg, acc):
    """``(model, tokenizer)`` of ``model.name_or_path`` on this rank's device, in eval mode."""
    from stagewise.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(model_cfg)
    model.to(acc.device)
    model.eval()
    return model, tokenizer


def gather_to_main(acc, items: list) -> list:
    """Every rank's python objects on the main process (in rank order); other ranks get []."""
    if acc.num_processes == 1:
        return list(items)
    import torch.distributed as dist

    out = [None] * acc.num_processes if acc.is_main_process else None
    dist.gather_object(items, out, dst=0)
    return [x for part in out for x in part] if acc.is_main_process else []


# ============================================================================================ in-loop use
def load_eval_prompts(cfg, tokenizer, system_prompt: Optional[str] = None):
    """The held-out prompts of ``cfg.data`` (``eval_sources``, else the ``eval_fraction`` split), as a prompt
    dataset; None when the data has no held-out part. Only the held-out sources are read when they are given."""
    from stagewise.data import build_prompts, load_sources
    from stagewise.data.mixture import load_mixture

    data = cfg.data
    cache = data.cache_dir or f"{cfg.paths.cache_dir}/tokenized"
    if data.eval_sources:
        chat, _ = load_mixture(list(data.eval_sources), data, cache, index_offset=len(data.sources))
    elif data.eval_fraction > 0:
        chat = load_sources(data, cache_dir=cache).eval
    else:
        return None
    prompts, _ = build_prompts(chat, tokenizer, data, system_prompt)
    return prompts


class GenerativeEval:
    """Held-out prompts, rewards and a generator bound together: ``gen_eval()`` returns the eval metrics of the
    current weights (for SFT, which has no rollout of its own)."""

    def __init__(self, acc, rollout, prompts, rewards, spec: EvalSpec, policy=None):
        self.acc, self.rollout, self.prompts, self.rewards, self.spec, self.policy = \
            acc, rollout, prompts, rewards, spec, policy

    @classmethod
    def from_config(cls, cfg, acc, policy, tokenizer, system_prompt: Optional[str] = None
                    ) -> Optional["GenerativeEval"]:
        """None unless ``reward.functions`` is set and the data has held-out prompts (the stage then evaluates at the
        start, every ``stage.eval_steps`` and at the end)."""
        if not cfg.reward.functions:
            return None
        from stagewise.rewards import RewardRunner

        spec = EvalSpec.from_config(cfg.stage, cfg.rollout)
        with acc.main_process_first():
            prompts = load_eval_prompts(cfg, tokenizer, system_prompt)
        if prompts is None or not len(prompts):
            log.warning("reward.functions is set but data has no held-out prompts (data.eval_sources / "
                        "data.eval_fraction): no generative eval")
            return None
        rollout = build_generator(cfg, policy, tokenizer, accelerator=acc)
        return cls(acc, rollout, prompts, RewardRunner(cfg.reward), spec, policy)

    def __call__(self) -> Dict[str, float]:
        if self.policy is not None:
            self.rollout.sync_weights(self.policy)
        metrics, _ = evaluate_prompts(self.acc, self.rollout, self.prompts, self.rewards, self.spec,
                                      show_progress=False)
        return metrics

    def close(self) -> None:
        self.rewards.close()
        self.rollout.close()
