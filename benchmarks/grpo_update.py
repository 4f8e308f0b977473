"""Seconds per GRPO update with completions of very different lengths: padded micro-batches vs packed, unpadded ones.

    python benchmarks/grpo_update.py                          # 8 prompts x 8 samples, lengths 32..256 (long tail)
    python benchmarks/grpo_update.py --min-length 64 --max-length 256 --budget 4096 --repeats 5 --threads 2

What it times: one optimizer step of ``stage=grpo`` on an already generated batch (`make_mini_batches` +
`train_on_batch`, forward, backward and the step), the phase that padding wastes compute in; generation is left out
because it is the same in both layouts. The batch: ``--prompts`` arithmetic prompts (chat-rendered, ~40 tokens) x
``--group`` completions whose lengths are drawn from a long-tailed (log-uniform) distribution between
``--min-length`` and ``--max-length``, as RL completions are (most short, a few run long); token ids are random.

Rows, each on the same batch and the same freshly built model (the tiny Qwen3 shape, or ``--hidden/--layers``):
  * padded: ``per_device_batch_size`` rows padded to the longest completion of each micro-batch, the prompt run for
    every row (what the GPU presets do: gradient checkpointing turns the shared-prefix pass off);
  * padded + shared prefix: the CPU default, each distinct prompt run once per micro-batch;
  * packed: ``hardware.max_tokens_per_micro_batch=--budget``, one unpadded row per micro-batch, each sequence with
    its prompt (what a model loaded with flash-attention gets);
  * packed + shared prefix: the same rows with each group's prompt laid down once (`stage=grpo`'s default with
    ``sdpa_varlen`` attention; `stagewise.models.attention`), also under gradient checkpointing.
Each row is repeated ``--repeats`` times, interleaved, and the median is reported; the ratio is padded / the row.
The four rows give the same update (tests/unit/test_grpo_loop.py checks equality to 1e-5).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_samples(tok, a):
    import random

    from stagewise.data.generators import arithmetic
    from stagewise.training.batching import Sample

    rng = random.Random(a.seed)
    rows = arithmetic(a.prompts, split="train", seed=0)
    samples = []
    for row in rows:
        text = tok.apply_chat_template([{"role": "user", "content": row["problem"]}], add_generation_prompt=True,
                                       tokenize=False)
        prompt = tok(text, add_special_tokens=False)["input_ids"]
        for k in range(a.group):
            n = int(round(a.min_length * (a.max_length / a.min_length) ** rng.random()))
            completion = [rng.randrange(10, len(tok) - 10) for _ in range(n)]
            samples.append(Sample(prompt_ids=prompt, completion_ids=completion, advantage=rng.gauss(0, 1),
                                  trained=True))
    return samples


def one_update(layout: str, samples, a) -> float:
    import torch
    from omegaconf import OmegaConf

    from stagewise.algorithms import PolicyLossSettings
    from stagewise.config import ModelConfig, TinyModelConfig
    from stagewise.hydra_config import compose
    from stagewise.models import load_model_and_tokenizer
    from stagewise.stages.grpo import StepPlan, make_mini_batches
    from stagewise.training.policy_update import StepContext, train_on_batch
    from stagewise.training import build_accelerator, build_scheduler
    from stagewise.training.batching import RowLayout

    cfg = compose(["stage=grpo", "algorithm=grpo", f"rollout.max_new_tokens={a.max_length}",
                   f"hardware.per_device_batch_size={a.per_device}"])
    acc = build_accelerator(cfg.hardware)
    model, tok = load_model_and_tokenizer(ModelConfig(tiny=TinyModelConfig(hidden_size=a.hidden,
                                                                           num_hidden_layers=a.layers)))
    model.train()
    ctx = StepContext(acc=acc, model=model, policy=model, ref_model=None, tokenizer=tok,
                      loss=PolicyLossSettings.from_config(cfg.algorithm, a.max_length), alg=cfg.algorithm,
                      hw=cfg.hardware, temperature=1.0, use_tis=False)
    row_layout = {"padded": RowLayout.PADDED, "shared": RowLayout.PADDED_SHARED_PREFIX, "packed": RowLayout.PACKED,
                  "packed_shared": RowLayout.PACKED_SHARED_PREFIX}[layout]
    plan = StepPlan(prompts_per_step=a.prompts, n=a.group, mini_batches=1, ppo_epochs=1, steps_per_epoch=1,
                    total_steps=1, world=1, per_device_batch_size=a.per_device, filter_groups=False,
                    max_resample_rounds=0, max_tokens_per_micro_batch=a.budget if row_layout.packed else 0,
                    layout=row_layout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    scheduler = build_scheduler(optimizer, cfg.stage, 1)
    start = time.perf_counter()
    minis = make_mini_batches(ctx, samples, plan, acc)
    train_on_batch(ctx, minis, optimizer, scheduler, max_grad_norm=1.0, ppo_epochs=1)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--min-length", type=int, default=32)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--per-device", type=int, default=8, help="padded rows per micro-batch")
    p.add_argument("--budget", type=int, default=2048, help="packed tokens per micro-batch")
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    import torch

    from stagewise.models import load_tokenizer
    from stagewise.config import ModelConfig

    torch.set_num_threads(a.threads)
    samples = make_samples(load_tokenizer(ModelConfig()), a)
    lengths = [len(s.completion_ids) for s in samples]
    real = sum(len(s.prompt_ids) + len(s.completion_ids) for s in samples)
    padded_tokens = 0
    for i in range(0, len(samples), a.per_device):
        part = samples[i:i + a.per_device]
        padded_tokens += len(part) * (max(len(s.prompt_ids) for s in part) + max(len(s.completion_ids) for s in part))
    layouts = {"padded": "padded (prompt per row)", "shared": "padded + shared prefix", "packed": "packed",
               "packed_shared": "packed + shared prefix"}
    times: dict[str, list[float]] = {k: [] for k in layouts}
    one_update("packed", samples[: a.group], a)  # warm-up: imports, allocator
    for _ in range(a.repeats):
        for layout in layouts:
            times[layout].append(one_update(layout, samples, a))
    median = {k: statistics.median(v) for k, v in times.items()}
    print(f"{len(samples)} completions, lengths {min(lengths)}..{max(lengths)} (median "
          f"{int(statistics.median(lengths))}); {real} real tokens, {padded_tokens} in padded micro-batches of "
          f"{a.per_device}; packed budget {a.budget} tokens; model hidden {a.hidden} x {a.layers} layers; "
          f"{a.threads} thread(s); median of {a.repeats}")
    print()
    print("| layout | s / update | padded / this |")
    print("|---|---|---|")
    for k, label in layouts.items():
        print(f"| {label} | {median[k]:.3f} | {median['padded'] / median[k]:.2f}x |")


if __name__ == "__main__":
    main()
