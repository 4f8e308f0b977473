"""Seconds per GRPO step on CPU: ``stage=grpo`` against TRL's ``GRPOTrainer``, same work in both.

    python benchmarks/grpo_step.py                      # 8 prompts x 8 samples x 64 tokens, 6 steps each
    python benchmarks/grpo_step.py --lengths long-tailed --length 128 --budget 2048   # completions of 32..128 tokens
    python benchmarks/grpo_step.py --lengths long-tailed --gradient-checkpointing
    python benchmarks/grpo_step.py --steps 8 --prompts 16 --group 8 --length 32 --threads 2 --repeats 2

Identical in both runs:
  * model: a Qwen3-shaped model built from the tiny config (~2M parameters), saved to a temp dir and loaded by path
    (TRL gets the path, as a user would give it). ``--lengths fixed`` (the default): its vocabulary is not padded
    and its EOS is a token the model cannot emit, so every completion is exactly ``--length`` tokens long in both
    frameworks. ``--lengths long-tailed``: the model is first taught (a few hundred plain next-token steps, before
    either framework runs) to end its completions after ``--length``/4 to ``--length`` tokens, most of them short;
    sampled at temperature 1 some end sooner (``--length 128``: 3..128 tokens, mean ~48), so a batch's lengths vary
    as real RL batches do; the lengths each side sampled are printed;
  * prompts: the same rendered chat prompts (R1-Zero system prompt + arithmetic question), in TRL as plain text;
  * group size, maximum completion length, sampling (temperature 1, no top-p/top-k), the reward function (fraction
    of digit characters), the loss (GRPO sequence-mean token-mean, group-std advantages, no KL), LR, one optimizer
    step per step on the whole batch, fp32, gradient checkpointing on or off, the same number of torch threads.
Ours runs twice: padded micro-batches (``hardware.max_tokens_per_micro_batch=0``, one micro-batch of the whole
batch, as TRL's) and packed unpadded rows of at most ``--budget`` tokens. Our step is read from metrics.jsonl
(``time/step`` and its phases); TRL's from a callback around each Trainer step (generation, scoring and the update
all happen inside it). The first step of each run (warm-up) is dropped and the median of the rest is taken; with
``--repeats`` the runs alternate and the best median of each is kept, which makes the comparison robust to other
load on the machine.
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


def build_model(root: Path, lengths: str, max_length: int, problems: list[str]) -> Path:
    """The tiny Qwen3 model without vocabulary padding. ``fixed``: its EOS id lies outside its output rows, so it
    never stops early. ``long-tailed``: taught to stop (`teach_lengths`)."""
    from stagewise.config import TinyModelConfig
    from stagewise.models import build_tiny

    model, tok = build_tiny(TinyModelConfig(pad_vocab_to_multiple_of=1))
    assert model.config.vocab_size == len(tok)
    if lengths == "fixed":
        tok.add_special_tokens({"eos_token": "<|bench_eos|>"})  # id == vocab_size: never sampled
    else:
        from stagewise.config import R1_ZERO_SYSTEM_PROMPT

        prompts = [tok.apply_chat_template([{"role": "system", "content": R1_ZERO_SYSTEM_PROMPT},
                                            {"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True) for q in problems]
        teach_lengths(model, tok, prompts, max_length)
    model.config.eos_token_id = tok.eos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    path = root / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tailed_length(u: float, max_length: int) -> int:
    """``max_length/4 x 4^(u^3)`` for a uniform ``u``: a quarter of the maximum at least, the median at ~1.3x that,
    one completion in ten above ~2.7x (a long tail, as reasoning RL's lengths have)."""
    return max(1, round(max_length / 4 * 4 ** (u ** 3)))


def teach_lengths(model, tok, prompts: list[str], max_length: int, steps: int = 300, batch: int = 16) -> None:
    """Plain next-token training (AdamW, lr 3e-3) on ``prompt + random digits and letters + EOS`` with completion
    lengths from `tailed_length`, the loss on the completion only: the model learns where to stop, not what to say.
    Deterministic (seed 0)."""
    import torch

    g = torch.Generator().manual_seed(0)
    alphabet = [t for t in (tok.convert_tokens_to_ids(c) for c in "0123456789abcdefghij+-=") if t is not None]
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        rows, labels = [], []
        for _ in range(batch):
            p = prompt_ids[int(torch.randint(len(prompt_ids), (1,), generator=g))]
            n = tailed_length(float(torch.rand(1, generator=g)), max_length)
            c = [alphabet[int(i)] for i in torch.randint(len(alphabet), (n,), generator=g)] + [tok.eos_token_id]
            rows.append(p + c)
            labels.append([-100] * len(p) + c)
        width = max(map(len, rows))
        ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
        lab = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def write_prompts(root: Path, num: int) -> tuple[Path, list[str]]:
    from stagewise.data.generators import arithmetic

    path = root / "prompts.jsonl"
    rows = list(arithmetic(num, split="train", seed=0))
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps({"problem": row["problem"], "answer": row["answer"]}) + "\n")
    return path, [row["problem"] for row in rows]


def ours(model_dir: Path, prompts: Path, run_dir: Path, a, budget: int) -> tuple[list[float], list[dict], list[str]]:
    """``stage=grpo``; ``budget`` > 0: packed unpadded micro-batches of at most that many tokens."""
    from dataclasses import replace

    from stagewise.config import R1_ZERO_SYSTEM_PROMPT
    from stagewise.hydra_config import compose
    from stagewise.data import load_prompt_dataset
    from stagewise.models import load_tokenizer
    from stagewise.stages import grpo

    cfg = compose([
        "stage=grpo", "algorithm=grpo", f"model.name_or_path={model_dir}", "model.dtype=float32",
        f"data.sources=[{{path: {prompts}}}]", "data.eval_sources=[]", "data.max_prompt_length=512",
        f"stage.prompts_per_step={a.prompts}", f"stage.max_steps={a.steps}", f"stage.learning_rate={a.lr}",
        "stage.samples_steps=0", "stage.save_steps=0", "stage.logging_steps=1",
        f"rollout.n={a.group}", f"rollout.max_new_tokens={a.length}", f"rollout.batch_size={a.prompts * a.group}",
        f"hardware.per_device_batch_size={a.prompts * a.group}", f"hardware.max_tokens_per_micro_batch={budget}",
        f"hardware.gradient_checkpointing={str(a.gradient_checkpointing).lower()}",
        "logger.sinks=[jsonl]", "logger.progress_bar=false",
        f"reward.functions=[{{name: '{Path(__file__).resolve()}:digit_fraction'}}]", f"paths.output_dir={run_dir}",
        f"run_dir={run_dir}",
    ])
    cfg = replace(cfg, data=replace(cfg.data, system_prompt=R1_ZERO_SYSTEM_PROMPT))  # as the R1-Zero data sets
    grpo.run(cfg)
    records = [json.loads(l) for l in open(run_dir / "metrics.jsonl")]
    steps = [r for r in records if "time/step" in r]
    # TRL gets exactly the prompts our run rendered (system prompt + chat template), as plain text
    data = load_prompt_dataset(cfg.data, load_tokenizer(cfg.model))
    texts = data.train["prompt"]
    return [r["time/step"] for r in steps], steps, texts


trl_lengths: list[dict] = []  # TRL's completions/* logs of the last run, in our metric names


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

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                trl_lengths.append({k: float(v) for k, v in logs.items() if k.startswith("completions/")})

    args = GRPOConfig(
        output_dir=str(out_dir), per_device_train_batch_size=a.prompts * a.group, gradient_accumulation_steps=1,
        num_generations=a.group, max_completion_length=a.length, num_iterations=1, beta=0.0, loss_type="grpo",
        scale_rewards="group", learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
        weight_decay=0.0, temperature=1.0, top_p=1.0, top_k=0, max_steps=a.steps, logging_steps=1, report_to="none",
        save_strategy="no", use_cpu=True, bf16=False, fp16=False, seed=0, dataloader_num_workers=0,
        disable_tqdm=True, log_completions=False, gradient_checkpointing=a.gradient_checkpointing)
    tok = AutoTokenizer.from_pretrained(model_dir)
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=[digit_fraction], args=args,
                          train_dataset=Dataset.from_dict({"prompt": list(texts)}), processing_class=tok)
    trainer.add_callback(StepTimer())
    trainer.train()
    return times


def median_after_warmup(times: list[float]) -> float:
    return statistics.median(times[1:] if len(times) > 1 else times)


def length_summary(records: list[dict]) -> str:
    """The completion lengths a run sampled (after the warm-up step) and the share of a padded batch that is real."""
    rs = records[1:] or records
    lo = min(r["completions/min_length"] for r in rs)
    hi = max(r["completions/max_length"] for r in rs)
    mean = statistics.mean(r["completions/mean_length"] for r in rs)
    real = statistics.mean(r["completions/mean_length"] / r["completions/max_length"] for r in rs)
    return f"lengths {lo:.0f}..{hi:.0f} (mean {mean:.1f}), real/padded completion tokens {real:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--length", type=int, default=64, help="completion tokens: all of them (fixed) or the maximum")
    p.add_argument("--lengths", choices=("fixed", "long-tailed"), default="fixed")
    p.add_argument("--budget", type=int, default=2048, help="tokens per packed micro-batch of our packed run")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    a = p.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.WARNING)
    for name in ("stagewise", "transformers", "trl", "datasets"):
        logging.getLogger(name).setLevel(logging.WARNING)

    runs = {"ours padded": 0, f"ours packed ({a.budget})": a.budget}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prompts, problems = write_prompts(root, max(64, a.prompts * (a.steps + 2)))
        model_dir = build_model(root, a.lengths, a.length, problems)
        best = {name: float("inf") for name in [*runs, "TRL"]}
        phases: dict = {}
        lengths: dict = {}
        for rep in range(a.repeats):
            for name, budget in runs.items():
                times, records, texts = ours(model_dir, prompts, root / f"{rep}_{budget}", a, budget)
                m = median_after_warmup(times)
                print(f"run {rep} {name}: {m:.3f}s/step {[round(t, 3) for t in times]}; {length_summary(records)}",
                      flush=True)
                if a.lengths == "fixed":
                    got = {r["completions/mean_length"] for r in records}
                    assert got == {float(a.length)}, f"our completions are not all {a.length} tokens: {got}"
                if m < best[name]:
                    best[name] = m
                    phases[name] = {k: statistics.median(r.get(f"time/{k}", 0.0) for r in records[1:] or records)
                                    for k in ("generate", "score", "logprobs", "update", "sync")}
                lengths[name] = length_summary(records)
            trl_lengths.clear()
            trl_times = trl(model_dir, texts, root / f"trl_{rep}", a)
            m = median_after_warmup(trl_times)
            lengths["TRL"] = length_summary(trl_lengths)
            print(f"run {rep} TRL: {m:.3f}s/step {[round(t, 3) for t in trl_times]}; {lengths['TRL']}", flush=True)
            best["TRL"] = min(best["TRL"], m)

    n = a.prompts * a.group
    print(f"\nGRPO step on CPU ({a.threads} threads): {a.prompts} prompts x {a.group} samples, {a.lengths} "
          f"completion lengths (at most {a.length} tokens) = {n} completions, one optimizer step, gradient "
          f"checkpointing {'on' if a.gradient_checkpointing else 'off'}")
    print(f"  {'run':<22} {'s/step':>7} {'TRL / run':>9}")
    for name, v in best.items():
        print(f"  {name:<22} {v:7.3f} {best['TRL'] / v:8.2f}x")
    padded, packed = list(runs)
    training = {name: phases[name]["logprobs"] + phases[name]["update"] for name in runs}
    generation = [phases[name]["generate"] for name in runs]
    if max(generation) > 1.25 * min(generation):  # the same work in both runs: a gap is the machine, not the code
        print(f"  WARNING: generation, the same work in both runs, took {generation[0]:.2f} s (padded) and "
              f"{generation[1]:.2f} s (packed): something else used the CPU during one of them, so the ratios below "
              f"are not reliable; rerun on an idle machine or with --repeats 3 (each run keeps its best median)")
    print(f"  packed / padded speed-up: {best[padded] / best[packed]:.2f}x per step, "
          f"{training[padded] / training[packed]:.2f}x in the training phases (log-probs + update; generation is "
          f"the same work in both)")
    print(f"  TRL: {lengths['TRL']}")
    for name in runs:
        print(f"  {name}: {lengths[name]}; median per phase:")
        for k, v in phases[name].items():
            print(f"    {k:<9} {v:7.3f} s  ({100 * v / best[name]:5.1f}%)")


if __name__ == "__main__":
    main()
