"""Seconds per GRPO step on CPU: ``stage=grpo`` against TRL's ``GRPOTrainer``, same work in both.

    python benchmarks/grpo_step.py                      # 8 prompts x 8 samples x 64 tokens, 6 steps each
    python benchmarks/grpo_step.py --steps 8 --prompts 16 --group 8 --length 32 --threads 2 --repeats 2

Identical in both runs:
  * model: a Qwen3-shaped model built from the tiny config (~2M parameters), saved to a temp dir and loaded by path
    (TRL gets the path, as a user would give it); its vocabulary is not padded and its EOS is a token the model
    cannot emit, so every completion is exactly ``--length`` tokens long in both frameworks (no early stops);
  * prompts: the same rendered chat prompts (R1-Zero system prompt + arithmetic question), in TRL as plain text;
  * group size, completion length, sampling (temperature 1, no top-p/top-k), the reward function (fraction of digit
    characters), the loss (GRPO sequence-mean token-mean, group-std advantages, no KL), LR, one optimizer step per
    step on the whole batch in one micro-batch, fp32, the same number of torch threads.
Our step is read from metrics.jsonl (``time/step`` and its phases); TRL's from a callback around each Trainer step
(generation, scoring and the update all happen inside it). The first step of each run (warm-up) is dropped and the
median of the rest is taken; with ``--repeats`` the runs alternate and the best median of each side is kept, which
makes the comparison robust to other load on the machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def digit_fraction(completions, **kwargs):
    """The shared reward: fraction of digit characters in the completion."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(1, len(t)) for t in texts]


def build_model(root: Path) -> Path:
    """The tiny Qwen3 model without vocabulary padding, whose EOS id lies outside its output rows."""
    from stagewise.config import TinyModelConfig
    from stagewise.models import build_tiny

    model, tok = build_tiny(TinyModelConfig(pad_vocab_to_multiple_of=1))
    assert model.config.vocab_size == len(tok)
    tok.add_special_tokens({"eos_token": "<|bench_eos|>"})  # id == vocab_size: never sampled
    model.config.eos_token_id = tok.eos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    path = root / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_prompts(root: Path, num: int) -> Path:
    from stagewise.data.generators import arithmetic

    path = root / "prompts.jsonl"
    with open(path, "w") as f:
        for row in arithmetic(num, split="train", seed=0):
            f.write(json.dumps({"problem": row["problem"], "answer": row["answer"]}) + "\n")
    return path


def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from stagewise.config import register_configs, validate_config
    from stagewise.run_folder import register_resolvers

    register_resolvers()
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=overrides)
    validate_config(cfg)
    return cfg


def ours(model_dir: Path, prompts: Path, run_dir: Path, a) -> tuple[list[float], list[dict], list[str]]:
    from omegaconf import open_dict

    from stagewise.stages import grpo

    cfg = compose([
        "stage=grpo", "algorithm=grpo", f"model.name_or_path={model_dir}", "model.dtype=float32",
        f"data.sources=[{{path: {prompts}}}]", "data.eval_sources=[]", "data.max_prompt_length=512",
        f"stage.prompts_per_step={a.prompts}", f"stage.max_steps={a.steps}", f"stage.learning_rate={a.lr}",
        "stage.samples_steps=0", "stage.save_steps=0", "stage.logging_steps=1",
        f"rollout.n={a.group}", f"rollout.max_new_tokens={a.length}", f"rollout.batch_size={a.prompts * a.group}",
        f"hardware.per_device_batch_size={a.prompts * a.group}", "logger.sinks=[jsonl]", "logger.progress_bar=false",
        f"reward.functions=[{{name: '{Path(__file__).resolve()}:digit_fraction'}}]", f"paths.output_dir={run_dir}",
    ])
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    grpo.run(cfg)
    records = [json.loads(l) for l in open(run_dir / "metrics.jsonl")]
    steps = [r for r in records if "time/step" in r]
    from stagewise.config import R1_ZERO_SYSTEM_PROMPT
    from stagewise.data import load_prompt_dataset
    from stagewise.models import load_tokenizer

    # TRL gets exactly the prompts our run rendered (system prompt + chat template), as plain text
    data = load_prompt_dataset(cfg.data, load_tokenizer(cfg.model), system_prompt=R1_ZERO_SYSTEM_PROMPT)
    texts = data.train["prompt"]
    return [r["time/step"] for r in steps], steps, texts


def trl(model_dir: Path, texts: list[str], out_dir: Path, a) -> list[float]:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    args = GRPOConfig(
        output_dir=str(out_dir), per_device_train_batch_size=a.prompts * a.group, gradient_accumulation_steps=1,
        num_generations=a.group, max_completion_length=a.length, num_iterations=1, beta=0.0, loss_type="grpo",
        scale_rewards="group", learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
        weight_decay=0.0, temperature=1.0, top_p=1.0, top_k=0, max_steps=a.steps, logging_steps=1, report_to="none",
        save_strategy="no", use_cpu=True, bf16=False, fp16=False, seed=0, dataloader_num_workers=0,
        disable_tqdm=True, log_completions=False)
    tok = AutoTokenizer.from_pretrained(model_dir)
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=[digit_fraction], args=args,
                          train_dataset=Dataset.from_dict({"prompt": list(texts)}), processing_class=tok)
    trainer.add_callback(StepTimer())
    trainer.train()
    return times


def median_after_warmup(times: list[float]) -> float:
    return statistics.median(times[1:] if len(times) > 1 else times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    a = p.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.WARNING)
    for name in ("stagewise", "transformers", "trl", "datasets"):
        logging.getLogger(name).setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = build_model(root)
        prompts = write_prompts(root, max(64, a.prompts * (a.steps + 2)))
        best_ours, best_trl, phases = float("inf"), float("inf"), {}
        for rep in range(a.repeats):
            ours_times, records, texts = ours(model_dir, prompts, root / f"ours_{rep}", a)
            trl_times = trl(model_dir, texts, root / f"trl_{rep}", a)
            m_ours, m_trl = median_after_warmup(ours_times), median_after_warmup(trl_times)
            print(f"run {rep}: ours {m_ours:.3f}s/step {[round(t, 3) for t in ours_times]} | "
                  f"TRL {m_trl:.3f}s/step {[round(t, 3) for t in trl_times]}", flush=True)
            lengths = {r["completions/mean_length"] for r in records}
            assert lengths == {float(a.length)}, f"our completions are not all {a.length} tokens: {lengths}"
            if m_ours < best_ours:
                best_ours = m_ours
                phases = {k: statistics.median(r.get(f"time/{k}", 0.0) for r in records[1:] or records)
                          for k in ("generate", "score", "logprobs", "update", "sync")}
            best_trl = min(best_trl, m_trl)

    n = a.prompts * a.group
    print(f"\nGRPO step on CPU ({a.threads} threads): {a.prompts} prompts x {a.group} samples x {a.length} tokens "
          f"= {n} completions, one optimizer step")
    print(f"  ours (stage=grpo):    {best_ours:7.3f} s/step")
    print(f"  TRL GRPOTrainer:      {best_trl:7.3f} s/step")
    print(f"  speed-up (TRL / ours): {best_trl / best_ours:5.2f}x   (target >= 1.0, goal 1.5)")
    print("  our step, median per phase:")
    for k, v in phases.items():
        print(f"    {k:<9} {v:7.3f} s  ({100 * v / best_ours:5.1f}%)")


if __name__ == "__main__":
    main()
