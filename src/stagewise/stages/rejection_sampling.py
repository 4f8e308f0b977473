"""Stage ``rejection_sampling``: turn a policy into SFT data by keeping its good samples (DeepSeek-R1 stage 3).

    python train.py stage=rejection_sampling model.name_or_path=<RL final/> data=<prompts> reward=<preset>
    python train.py pipeline=r1          # SFT -> reasoning RL -> rejection sampling -> SFT -> utility RL

Features (flag):
  * ``rollout.n`` completions per prompt of ``data.sources`` (defaults: 5, temperature 0.7, top_p 0.9; any
    ``rollout.backend``), scored by the ``reward=`` preset; the prompts are built as GRPO builds them (same system
    prompt rule), so the samples come from the distribution RL trained on
  * acceptance: score >= ``stage.acceptance_threshold`` (0.8), where the score is the weighted mean of the rewards
    or ``stage.score_reward`` (`stagewise.evaluation.acceptance_scores`); completions cut at
    ``rollout.max_new_tokens`` are rejected unless ``stage.keep_truncated`` (they never finish, and SFT on them would
    teach the model not to stop)
  * de-duplication per prompt (whitespace-insensitive), optionally only the best completion per prompt
    (``stage.best_per_prompt``; ties go to the first sample)
  * multi-turn (``env=code_sandbox``): whole agent trajectories are sampled and scored; an accepted one becomes one
    assistant message with its ``<Execute>`` spans inline, DeepAnalyze's SFT format (SFT masks those spans)
  * general data: rows of ``stage.general_sources`` are added so that they make up ``stage.general_data_ratio`` of
    the output (R1: ~200k general next to ~600k reasoning = 0.25); sampled with ``data.seed``, repeated whole when
    the sources are smaller than asked
Writes, in the run folder: ``sft.parquet`` (``messages`` = the prompt conversation + the accepted completion as the
assistant turn, ``origin``, ``kind`` reasoning|general, ``score``, and the prompt's gold columns such as ``answer``,
so a later RL stage can reuse the prompts); ``rejection_summary.json`` (acceptance rate and counts per source and in
total); ``samples/step_0.parquet`` (every completion with its rewards, score, accepted, kept); ``result.json``.
A pipeline feeds ``sft.parquet`` to the next SFT stage.

Where we depart from the paper: R1 also filtered chains of thought with mixed languages, long paragraphs and code
blocks, and used DeepSeek-V3 as a generative judge for prompts without rule-based answers. Here every filter is a
reward (``language_consistency``, ``format``, ``judge``, ``reward_model`` ...) folded into one score and threshold,
so what counts as "good" is the reward preset, the same object RL optimised.

Distributed: each rank samples a strided share of the prompts; rank 0 gathers the results and writes every file.
Not resumable inside the stage: an interrupted run samples again from the start (a pipeline reruns only this stage).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from stagewise.config import TrainConfig
from stagewise.data import load_prompt_dataset
from stagewise.evaluation import (
    EvalSpec,
    gather_to_main,
    generate_and_score,
    generation_setup,
    is_correct,
    prompts_per_call,
    rank_share,
    results_table,
)
from stagewise.rewards import RewardRunner
from stagewise.rollout import build_generator, check_sampling
from stagewise.run_folder import RunFolder
from stagewise.tracking import Tracker
from stagewise.training import end_run

log = logging.getLogger(__name__)

# prompt-dataset columns that are not gold data for rewards
_PROMPT_COLUMNS = ("messages", "prompt", "prompt_ids", "prompt_length", "source")


# ============================================================================================ the stage
def run(cfg: TrainConfig) -> dict:
    # ------------------------------------------------------------------ setup
    check_config(cfg)
    icfg, acc, run_folder, model, tokenizer = generation_setup(cfg)
    with acc.main_process_first():
        prompts = load_prompt_dataset(cfg.data, tokenizer).train
        general_ds = load_general_data(cfg)  # read now: a bad path fails before hours of sampling
    rewards = RewardRunner(cfg.reward)
    rollout = build_generator(icfg, model, tokenizer, accelerator=acc, run_dir=run_folder.root)
    spec = sampling_spec(cfg)
    if acc.is_main_process:
        log.info("rejection sampling: %d prompts x %d samples (temperature %g, top_p %g), accept score >= %g (%s)",
                 len(prompts), spec.num_samples, spec.temperature, spec.top_p, spec.threshold,
                 spec.score_reward or "weighted mean of " + ", ".join(rewards.names))

    # ------------------------------------------------------------------ sample and score
    t0 = time.time()
    rows, real = rank_share(len(prompts), acc.process_index, acc.num_processes)
    mine = generate_and_score(acc, rollout, prompts, rows, rewards, spec, keep_texts=True,
                              desc="rejection sampling", show_progress=bool(cfg.logger.progress_bar), real=real)
    results = sorted(gather_to_main(acc, mine), key=lambda r: r.row)
    rollout.close()
    rewards.close()

    # ------------------------------------------------------------------ select, mix, save (rank 0)
    metrics: Dict[str, Any] = {}
    if acc.is_main_process:
        metrics = select_mix_and_write(cfg, results, prompts, general_ds, run_folder, seconds=time.time() - t0)
        with Tracker(cfg, run_folder.root, stage="rejection_sampling") as tracker:
            tracker.log(metrics, step=0)

    # ------------------------------------------------------------------ cleanup
    end_run(acc)
    if acc.is_main_process and metrics["rs/kept"] == 0:
        raise RuntimeError(f"rejection sampling kept no completion of {metrics['rs/samples']} (none scored >= "
                           f"stage.acceptance_threshold={cfg.stage.acceptance_threshold}); see "
                           f"{run_folder.root}/rejection_summary.json and samples/step_0.parquet")
    return metrics


# ============================================================================================ config
def check_config(cfg: TrainConfig) -> None:
    """Fail before loading anything, naming the bad key."""
    st = cfg.stage
    if not cfg.reward.functions:
        raise ValueError("stage=rejection_sampling needs a reward to accept by: set reward=<preset> or "
                         "reward.functions")
    ro = cfg.rollout
    check_sampling(ro.n, ro.temperature, ro.top_p, ro.top_k, ro.max_new_tokens)
    if not 0 <= st.general_data_ratio < 1:
        raise ValueError(f"stage.general_data_ratio={st.general_data_ratio} must be in [0, 1)")
    if st.general_data_ratio > 0 and not st.general_sources:
        raise ValueError(f"stage.general_data_ratio={st.general_data_ratio} but stage.general_sources is empty: "
                         "list the general SFT data, e.g. stage.general_sources=[{path: general.jsonl}]")


def sampling_spec(cfg: TrainConfig) -> EvalSpec:
    ro, st = cfg.rollout, cfg.stage
    return EvalSpec(num_samples=int(ro.n), temperature=float(ro.temperature), top_p=float(ro.top_p),
                    max_new_tokens=int(ro.max_new_tokens), stop=tuple(ro.stop),
                    threshold=float(st.acceptance_threshold), score_reward=st.score_reward,
                    pass_k=(1,), prompts_per_call=prompts_per_call(ro, int(ro.n)))


# ============================================================================================ the rules
@dataclass(frozen=True)
class Candidate:
    prompt: str  # the rendered prompt: completions of the same prompt text are one group
    text: str
    score: Optional[float]
    truncated: bool = False


def accept(c: Candidate, threshold: float, keep_truncated: bool = False) -> bool:
    """The acceptance rule: scored, ``score >= threshold``, and finished (unless ``keep_truncated``)."""
    return is_correct(c.score, threshold) and (keep_truncated or not c.truncated)


def _dedupe_key(c: Candidate) -> Tuple[str, str]:
    return c.prompt, " ".join(c.text.split())


def select_completions(candidates: Sequence[Candidate], threshold: float, *, best_per_prompt: bool = False,
                       keep_truncated: bool = False) -> Tuple[List[int], Dict[str, int]]:
    """Indices of the kept candidates (in input order) and the counts behind them: ``samples``, ``above_threshold``,
    ``truncated_rejected``, ``accepted`` (the rule `accept`), ``duplicates``, ``not_best``, ``kept``."""
    counts = dict.fromkeys(("samples", "above_threshold", "truncated_rejected", "accepted", "duplicates",
                            "not_best", "kept"), 0)
    counts["samples"] = len(candidates)
    seen, kept = set(), []
    for i, c in enumerate(candidates):
        if not is_correct(c.score, threshold):
            continue
        counts["above_threshold"] += 1
        if not accept(c, threshold, keep_truncated):
            counts["truncated_rejected"] += 1
            continue
        counts["accepted"] += 1
        key = _dedupe_key(c)
        if key in seen:
            counts["duplicates"] += 1
            continue
        seen.add(key)
        kept.append(i)
    if best_per_prompt:
        best: Dict[str, int] = {}
        for i in kept:
            p = candidates[i].prompt
            if p not in best or candidates[i].score > candidates[best[p]].score:
                best[p] = i
        counts["not_best"] = len(kept) - len(best)
        kept = sorted(best.values())
    counts["kept"] = len(kept)
    return kept, counts


def general_rows_needed(num_reasoning: int, ratio: float) -> int:
    """General rows to add so that they are ``ratio`` of the output: ``ratio = g / (g + num_reasoning)``."""
    if not 0 <= ratio < 1:
        raise ValueError(f"stage.general_data_ratio={ratio} must be in [0, 1)")
    return int(round(num_reasoning * ratio / (1 - ratio)))


# ============================================================================================ output
def select_mix_and_write(cfg: TrainConfig, results, prompts, general_ds, run_folder: RunFolder, seconds: float
                         ) -> Dict[str, Any]:
    st = cfg.stage
    texts = prompts["prompt"]
    candidates, origin, rows = [], [], []
    for r in results:
        for j, text in enumerate(r.texts):
            candidates.append(Candidate(texts[r.row], text, r.scores[j], bool(r.truncated[j])))
            origin.append(r.source)
            rows.append(r.row)
    kept, counts = select_completions(candidates, float(st.acceptance_threshold), best_per_prompt=st.best_per_prompt,
                                      keep_truncated=st.keep_truncated)
    kept_set = set(kept)

    # reasoning rows: the prompt conversation + the accepted completion
    gold_cols = [c for c in prompts.column_names if c not in _PROMPT_COLUMNS]
    records = []
    for i in kept:
        row = prompts[rows[i]]
        records.append({"messages": list(row["messages"]) + [{"role": "assistant", "content": candidates[i].text}],
                        "origin": origin[i], "kind": "reasoning", "score": float(candidates[i].score),
                        **{c: row[c] for c in gold_cols}})
    general, general_counts = sample_general_rows(general_ds, general_rows_needed(len(records),
                                                                                  float(st.general_data_ratio)), cfg)
    records += [{**g, **{c: None for c in gold_cols}} for g in general]
    path = write_parquet(records, run_folder.root / "sft.parquet")

    # the per-completion table and the summary
    table = results_table(results, prompts, float(st.acceptance_threshold))
    table["accepted"] = [accept(c, float(st.acceptance_threshold), st.keep_truncated) for c in candidates]
    table["kept"] = [i in kept_set for i in range(len(candidates))]
    run_folder.samples.mkdir(parents=True, exist_ok=True)
    table.insert(0, "step", 0)
    table.to_parquet(run_folder.sample_file(0), index=False)
    summary = build_summary(cfg, candidates, origin, kept, counts, general_counts, len(records), seconds)
    (run_folder.root / "rejection_summary.json").write_text(json.dumps(summary, indent=2))
    metrics = {"rs/prompts": float(len(results)), "rs/samples": float(counts["samples"]),
               "rs/accepted": float(counts["accepted"]),
               "rs/acceptance_rate": summary["total"]["acceptance_rate"],
               "rs/prompts_with_accepted": summary["total"]["prompts_with_accepted"],
               "rs/kept": float(counts["kept"]), "rs/general_rows": float(len(general)),
               "rs/rows": float(len(records)),
               "rs/reward/total/mean": float(np.mean([t for r in results for t in r.totals])) if results else 0.0,
               "rs/seconds": round(seconds, 2)}
    (run_folder.root / "result.json").write_text(json.dumps(metrics, indent=2))
    log.info("rejection sampling: accepted %d of %d completions (%.1f%%), kept %d after de-duplication%s, "
             "+%d general rows -> %s (%d rows)", counts["accepted"], counts["samples"],
             100 * summary["total"]["acceptance_rate"], counts["kept"],
             " and best-per-prompt" if st.best_per_prompt else "", len(general), path, len(records))
    return metrics


def build_summary(cfg, candidates, origin, kept, counts, general_counts, rows, seconds) -> Dict[str, Any]:
    st, ro = cfg.stage, cfg.rollout
    th = float(st.acceptance_threshold)

    def per(idx: Sequence[int], kept_idx: Sequence[int]) -> Dict[str, Any]:
        cands = [candidates[i] for i in idx]
        accepted = [c for c in cands if accept(c, th, st.keep_truncated)]
        groups = {c.prompt for c in cands}
        return {"prompts": len(groups), "samples": len(cands), "accepted": len(accepted),
                "acceptance_rate": len(accepted) / len(cands) if cands else 0.0,
                "prompts_with_accepted": len({c.prompt for c in accepted}) / len(groups) if groups else 0.0,
                "kept": len(kept_idx)}

    sources = sorted(set(origin))
    kept_by = {s: [i for i in kept if origin[i] == s] for s in sources}
    return {
        "threshold": th, "score": st.score_reward or "weighted mean of the rewards",
        "samples_per_prompt": int(ro.n), "temperature": float(ro.temperature), "top_p": float(ro.top_p),
        "max_new_tokens": int(ro.max_new_tokens), "best_per_prompt": bool(st.best_per_prompt),
        "keep_truncated": bool(st.keep_truncated),
        "sources": {s: per([i for i, o in enumerate(origin) if o == s], kept_by[s]) for s in sources},
        "total": {**per(range(len(candidates)), kept), **counts},
        "general": {"ratio": float(st.general_data_ratio), "rows": sum(general_counts.values()),
                    "sources": general_counts},
        "rows": rows, "file": "sft.parquet", "seconds": round(seconds, 2),
    }


def load_general_data(cfg: TrainConfig):
    """``stage.general_sources`` as one chat dataset (their own system prompts kept), or None."""
    if not cfg.stage.general_sources or cfg.stage.general_data_ratio <= 0:
        return None
    from stagewise.data.mixture import load_mixture

    data_cfg = replace(cfg.data, system_prompt=None, eval_sources=[], eval_fraction=0.0)
    cache = cfg.data.cache_dir or f"{cfg.paths.cache_dir}/tokenized"
    ds, _ = load_mixture(list(cfg.stage.general_sources), data_cfg, cache, index_offset=10_000)
    return ds


def sample_general_rows(ds, needed: int, cfg: TrainConfig) -> Tuple[List[Dict[str, Any]], Dict[str, int]]:
    """``needed`` rows of the general data, sampled with ``data.seed`` (whole repeats when it is too small)."""
    if needed <= 0 or ds is None:
        return [], {}
    from stagewise.data.mixture import sample_indices

    if needed > len(ds):
        log.warning("stage.general_sources have %d rows, %d asked for (general_data_ratio=%s): rows are repeated",
                    len(ds), needed, cfg.stage.general_data_ratio)
    idx = sample_indices(len(ds), needed, None, np.random.default_rng([int(cfg.data.seed), 10_000]),
                         "stage.general_sources")
    out, counts = [], {}
    for i in idx:
        row = ds[int(i)]
        if not any(m["role"] == "assistant" for m in row["messages"]):
            raise ValueError(f"stage.general_sources: a row of {row['source']!r} has no assistant message; general "
                             "data must be complete conversations")
        out.append({"messages": row["messages"], "origin": row["source"], "kind": "general", "score": None})
        counts[row["source"]] = counts.get(row["source"], 0) + 1
    return out, counts


def write_parquet(records: List[Dict[str, Any]], path: Path) -> Path:
    """Write atomically (``.tmp`` then rename), with ``messages`` as the chat schema SFT reads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    fields = [pa.field("messages", pa.list_(message)), pa.field("origin", pa.string()), pa.field("kind", pa.string()),
              pa.field("score", pa.float64())]
    if records:
        extra = [k for k in records[0] if k not in ("messages", "origin", "kind", "score")]
        inferred = pa.Table.from_pylist(records).schema
        fields += [inferred.field(k) for k in extra]
    table = pa.Table.from_pylist(records, schema=pa.schema(fields))
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path
