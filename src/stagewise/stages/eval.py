"""Stage ``eval``: mean reward, accuracy and pass@k of any checkpoint on a prompt dataset. Changes no model.

    python train.py stage=eval model.name_or_path=<run>/final data=tiny_grpo reward=<preset>
    python train.py stage=eval model.name_or_path=<run>/checkpoints/step_200/model ...
    python train.py stage=eval ... stage.pass_k=[1,8] stage.eval_num_samples=16 rollout.temperature=0.6

Features (flag):
  * the prompts: the held-out split of ``data`` (``data.eval_sources`` or ``data.eval_fraction``), or all of
    ``data.sources`` when it has none; the first ``stage.num_eval_prompts`` of them (0 = all); built as GRPO builds
    its prompts (same system-prompt rule), so a pipeline evaluates on what RL trained on
  * ``stage.pass_k`` [1]: one greedy completion per prompt; with any k > 1, ``stage.eval_num_samples`` (0 = max k)
    samples at ``rollout.temperature`` / ``rollout.top_p``, and the unbiased pass@k estimator
  * correct = score >= ``stage.acceptance_threshold``, the score being the weighted mean of ``reward=`` or
    ``stage.score_reward`` (see `stagewise.evaluation`)
  * any ``rollout.backend``; every rank evaluates a strided share of the prompts
  * multi-turn with ``env=code_sandbox``: the agent loop generates whole trajectories (each prompt's row is its task)
Writes ``eval.json`` (the metrics, the settings, and per-source accuracy), ``result.json`` (the metrics, read by
pipelines and `stagewise.runs`), ``samples/step_0.parquet`` (every completion with its rewards and score) and one
``metrics.jsonl`` record. The same generate-score-summarise code runs inside SFT and GRPO every ``stage.eval_steps``.
"""

from __future__ import annotations

import json
import logging
import time

from stagewise.config import TrainConfig
from stagewise.data import load_prompt_dataset
from stagewise.evaluation import (
    EvalSpec,
    evaluate_prompts,
    generation_setup,
    results_table,
)
from stagewise.rewards import RewardRunner
from stagewise.rollout import build_generator
from stagewise.tracking import Tracker
from stagewise.training import end_run

log = logging.getLogger(__name__)


def run(cfg: TrainConfig) -> dict:
    # ------------------------------------------------------------------ setup
    if not cfg.reward.functions:
        raise ValueError("stage=eval needs a reward to score completions: set reward=<preset> or reward.functions")
    spec = EvalSpec.from_config(cfg.stage, cfg.rollout)
    icfg, acc, run_folder, model, tokenizer = generation_setup(cfg)
    with acc.main_process_first():
        data = load_prompt_dataset(cfg.data, tokenizer)
    prompts, split = (data.eval, "eval") if data.eval is not None else (data.train, "train")
    rewards = RewardRunner(cfg.reward)
    rollout = build_generator(icfg, model, tokenizer, accelerator=acc, run_dir=run_folder.root)
    if acc.is_main_process:
        log.info("eval of %s on %d %s prompts: %s", cfg.model.name_or_path,
                 min(spec.num_prompts or len(prompts), len(prompts)), split,
                 "1 greedy completion each" if spec.num_samples == 1 else
                 f"{spec.num_samples} samples each at temperature {spec.temperature}, pass@{list(spec.pass_k)}")

    # ------------------------------------------------------------------ generate, score, summarise
    t0 = time.time()
    metrics, results = evaluate_prompts(acc, rollout, prompts, rewards, spec, keep_texts=True,
                                        show_progress=bool(cfg.logger.progress_bar))
    seconds = time.time() - t0

    # ------------------------------------------------------------------ save (rank 0)
    if acc.is_main_process:
        report = {"model": str(cfg.model.name_or_path), "split": split, "metrics": metrics,
                  "settings": {"pass_k": list(spec.pass_k), "samples_per_prompt": spec.num_samples,
                               "temperature": spec.temperature, "top_p": spec.top_p,
                               "max_new_tokens": spec.max_new_tokens, "threshold": spec.threshold,
                               "score": spec.score_reward or "weighted mean of the rewards",
                               "rewards": list(rewards.names)},
                  "seconds": round(seconds, 2)}
        (run_folder.root / "eval.json").write_text(json.dumps(report, indent=2))
        (run_folder.root / "result.json").write_text(json.dumps(metrics, indent=2))
        table = results_table(results, prompts, spec.threshold)
        table.insert(0, "step", 0)
        run_folder.samples.mkdir(parents=True, exist_ok=True)
        table.to_parquet(run_folder.sample_file(0), index=False)
        with Tracker(cfg, run_folder.root, stage="eval") as tracker:
            tracker.log(metrics, step=0)
        log.info("eval: accuracy %.4f, %s, mean reward %.4f on %d prompts (%.1fs)", metrics["eval/accuracy"],
                 ", ".join(f"pass@{k} {metrics[f'eval/pass@{k}']:.4f}" for k in spec.pass_k),
                 metrics["eval/reward/total/mean"], int(metrics["eval/num_prompts"]), seconds)

    # ------------------------------------------------------------------ cleanup
    rewards.close()
    rollout.close()
    end_run(acc)
    return metrics
