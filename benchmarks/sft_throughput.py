"""SFT training throughput on CPU: ``stage=sft`` against TRL's ``SFTTrainer``, same work in both.

    python benchmarks/sft_throughput.py                  # 18M-param model, 4 bins x 512 tokens, 6 steps, 2 repeats
    python benchmarks/sft_throughput.py --steps 4 --repeats 1 --no-padded          # quick check, packed row only
    python benchmarks/sft_throughput.py --hidden 384 --layers 6 --max-length 1024 --bins 2 --threads 2 --repeats 3

Identical in both runs:
  * model: a Qwen3-shaped model built from the tiny config (``--hidden``/``--layers``; 18M parameters by default,
    so that compute dominates), saved to a temp dir and loaded by path (``model.name_or_path=<path>``; TRL gets the
    path, as a user would give it); fp32, sdpa attention, no gradient checkpointing, the same torch threads;
  * data: the same jsonl of chat rows (``messages``: user + assistant, a quarter of them two turns), of log-uniform
    lengths from ~30 tokens up to ``--max-length`` (none longer, so neither side drops nor truncates a row);
  * loss: assistant-only through the tokenizer's chat template, whose ``{% generation %}`` markers give the mask
    in both (TRL ``assistant_only_loss=True``; every assistant turn and its ``<|im_end|>`` trained); the script
    checks that both sides train exactly the same number of tokens over the dataset; token-mean cross-entropy;
  * packing: best-fit-decreasing into ``--max-length`` bins on both sides (TRL ``packing=True``,
    ``packing_strategy="bfd"``, its default), position ids restarting per document and no attention across
    documents; ``--bins`` bins per optimizer step in one micro-batch (gradient accumulation 1);
  * padded row (``--padded``, on by default): ``data.packing=false`` / ``packing=False``, ``--padded-batch`` rows
    per step, right-padded to the longest row of the batch with an attention mask;
  * optimizer: AdamW (torch's, non-fused: TRL ``optim="adamw_torch"``), betas (0.9, 0.95), weight decay 0.1,
    constant LR, no warmup, gradient clipping at 1.0, one optimizer step per step.
How the work differs (by design of each framework, not of this script): TRL's bfd packing is padding-free, i.e. it
concatenates the step's bins into one row ``[1, bins x max_length]``; on CPU sdpa, transformers turns the position
ids into a dense block-diagonal mask over that whole row, so attention costs ``(bins x L)^2`` instead of our
``bins x L^2`` (``[bins, L]`` rows, block-diagonal mask per row). TRL also computes entropy and token accuracy
every step; ours computes log-probs through a chunked lm_head. Data order differs (both seeded shuffles), so the
bins of a step differ; tokens per step are reported for both.

Each side runs in its own fresh Python process (so peak RSS is per side and neither inherits the other's allocator
state). A step is timed end to end: from the end of the previous step to the end of this one (data fetch,
collation, forward, backward, clipping, optimizer step, logging). Ours: consecutive ``time`` stamps of the step
records in ``metrics.jsonl`` (``stage.logging_steps=1``); TRL: consecutive ``on_step_end`` callbacks (its
``on_step_begin``..``on_step_end`` span, which excludes the data fetch, is printed too). The first step of each run
(warm-up) is therefore dropped and the median of the rest is taken; trained tokens/s is the median over the same
steps of (loss-carrying tokens of the step / its seconds). With ``--repeats`` the runs alternate (order flipped each
repeat) and the best median of each side is kept, which makes the ratio robust to other load on the machine.
Packing efficiency: bin fill = non-pad tokens / (bins x max_length) over the packed dataset; step fill = non-pad
tokens / slots of the tensors actually fed to the model in the timed steps.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ("we load the table then group rows by region and compute the mean revenue per month before plotting a "
         "chart of sales figures with error bars check missing values drop duplicates merge two frames on the key "
         "column and report the result in a short summary").split()
IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------- shared inputs
def build_model(root: Path, a) -> tuple[Path, int]:
    """The Qwen3-shaped model (tiny config, larger shape) and the tiny tokenizer, saved for loading by path."""
    from stagewise.config import TinyModelConfig
    from stagewise.models import build_tiny

    model, tok = build_tiny(TinyModelConfig(
        hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
        num_attention_heads=a.hidden // 64, num_key_value_heads=2, head_dim=64,
        max_position_embeddings=max(4096, a.max_length * max(a.bins, 1))))
    path = root / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, sum(p.numel() for p in model.parameters())


def write_rows(root: Path, model_dir: Path, a) -> tuple[Path, dict]:
    """Chat rows whose templated length is log-uniform in [~30, max_length] tokens; none longer than max_length."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(0)
    text = lambda n: " ".join(rng.choice(WORDS) for _ in range(max(1, n)))  # noqa: E731  (~2 tokens per word)
    path, lengths = root / "chat.jsonl", []
    with open(path, "w") as f:
        while len(lengths) < a.rows:
            target = math.exp(rng.uniform(math.log(30), math.log(a.max_length)))  # tokens
            turns = 2 if rng.random() < 0.25 else 1
            messages = []
            for _ in range(turns):
                user = rng.randint(3, 25)
                messages += [{"role": "user", "content": text(user)},
                             {"role": "assistant", "content": text(int(target / 2 / turns) - user - 6)}]
            n = len(tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
            if n > a.max_length:
                continue
            lengths.append(n)
            f.write(json.dumps({"messages": messages}) + "\n")
    return path, {"rows": len(lengths), "mean_tokens": statistics.mean(lengths), "max_tokens": max(lengths)}


def step_stats(ends: list[float], tokens: list[int]) -> dict:
    """Steps 2..n: seconds (end to end) and trained tokens/s; the first step (warm-up) has no previous end."""
    dts = [b - e for e, b in zip(ends, ends[1:])]
    return {"s_per_step": statistics.median(dts) if dts else float("nan"),
            "tokens_per_s": statistics.median(t / d for t, d in zip(tokens[1:], dts)) if dts else float("nan"),
            "steps_s": dts, "tokens_per_step": statistics.mean(tokens[1:]) if dts else float("nan")}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ------------------------------------------------------------------------------------------------ one run each
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


def ours(spec: dict) -> dict:
    import torch
    from omegaconf import open_dict

    from stagewise.stages import sft

    run_dir, packed = Path(spec["run_dir"]), spec["packed"]
    batch = spec["bins"] if packed else spec["padded_batch"]
    cfg = compose([
        "stage=sft", "algorithm=sft", f"model.name_or_path={spec['model_dir']}", "model.dtype=float32",
        "model.attn_implementation=sdpa", f"data.sources=[{{path: {spec['rows']}}}]", "data.eval_sources=[]",
        f"data.max_length={spec['max_length']}", f"data.packing={str(packed).lower()}",
        f"data.cache_dir={Path(spec['root']) / 'cache'}", f"stage.max_steps={spec['steps']}",
        f"stage.learning_rate={spec['lr']}", "stage.lr_scheduler=constant", "stage.warmup_ratio=0",
        "stage.weight_decay=0.1", "stage.adam_beta1=0.9", "stage.adam_beta2=0.95", "stage.max_grad_norm=1.0",
        "stage.logging_steps=1", "stage.save_steps=0", "stage.eval_steps=0", f"hardware.per_device_batch_size={batch}",
        "hardware.grad_accum_steps=1", "hardware.gradient_checkpointing=false", "logger.sinks=[jsonl]",
        "logger.progress_bar=false", f"paths.output_dir={run_dir}",
    ])
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)

    fed: list[tuple[int, int]] = []  # (non-pad tokens, slots) of each collated micro-batch

    class CountingCollator(sft.SFTCollator):
        def __call__(self, items):
            out = super().__call__(items)
            fed.append((sum(len(it["input_ids"]) for it in items), out["input_ids"].numel()))
            return out

    sft.SFTCollator = CountingCollator  # instrumentation only: the same collator, plus two integer sums
    sft.run(cfg)
    records = [json.loads(l) for l in open(run_dir / "metrics.jsonl")]
    data = {k: v for r in records for k, v in r.items() if k.startswith("data/")}
    steps = [r for r in records if "trained_tokens" in r]
    assert len(steps) == spec["steps"] and len(fed) == spec["steps"], (len(steps), len(fed))
    tokens = [r["trained_tokens"] for r in steps]
    inner = [r["trained_tokens"] / r["tokens_per_s"] for r in steps]  # the stage's own window: collation..logging
    return {**step_stats([r["time"] for r in steps], tokens),
            "inner_s": statistics.median(inner[1:]), "dataset_trained_tokens": data.get("data/trained_tokens"),
            "bin_fill": data.get("data/packing_efficiency"),
            "step_fill": sum(t for t, _ in fed[1:]) / max(1, sum(s for _, s in fed[1:])),
            "rows_per_step": batch, "threads": torch.get_num_threads(), "rss_mb": peak_rss_mb()}


def trl(spec: dict) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    packed = spec["packed"]
    batch = spec["bins"] if packed else spec["padded_batch"]
    ends: list[float] = []
    inner: list[float] = []
    fed: list[tuple[int, int, int]] = []  # (trained tokens, non-pad tokens, slots) of each micro-batch

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())
            inner.append(ends[-1] - self.t0)

    class CountingSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            if model.training:
                ids = inputs["input_ids"]
                mask = inputs.get("attention_mask")
                fed.append((int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum()),
                            int(mask.sum()) if mask is not None else ids.numel(), ids.numel()))
            return super().compute_loss(model, inputs, *args, **kwargs)

    args = SFTConfig(
        output_dir=spec["run_dir"], per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        max_length=spec["max_length"], packing=packed, packing_strategy="bfd", assistant_only_loss=True,
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.1, adam_beta1=0.9,
        adam_beta2=0.95, optim="adamw_torch", max_grad_norm=1.0, max_steps=spec["steps"], logging_steps=1,
        report_to="none", save_strategy="no", use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        seed=0, dataloader_num_workers=0, disable_tqdm=True)
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    rows = load_dataset("json", data_files=spec["rows"], split="train")
    trainer = CountingSFTTrainer(model=spec["model_dir"], args=args, train_dataset=rows, processing_class=tok)
    assert trainer.model.config._attn_implementation == "sdpa", trainer.model.config._attn_implementation
    assert trainer.model.dtype == torch.float32, trainer.model.dtype
    ds = trainer.train_dataset
    trained = sum(sum(l != IGNORE_INDEX for l in labels) for labels in ds["labels"])
    bin_fill = None
    if packed:
        bin_fill = sum(sum(s) for s in ds["seq_lengths"]) / (len(ds) * spec["max_length"])
    trainer.add_callback(StepTimer())
    trainer.train()
    assert len(ends) == spec["steps"] and len(fed) == spec["steps"], (len(ends), len(fed))
    return {**step_stats(ends, [t for t, _, _ in fed]), "inner_s": statistics.median(inner[1:]),
            "dataset_trained_tokens": trained, "bin_fill": bin_fill,
            "step_fill": sum(n for _, n, _ in fed[1:]) / max(1, sum(s for _, _, s in fed[1:])),
            "rows_per_step": batch, "threads": torch.get_num_threads(), "rss_mb": peak_rss_mb()}


def child(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    logging.basicConfig(level=logging.WARNING)
    for name in ("stagewise", "transformers", "trl", "datasets", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    result = (ours if spec["side"] == "ours" else trl)(spec)
    print("RESULT " + json.dumps(result), flush=True)


def launch(spec: dict) -> dict:
    """One run in a fresh Python process; its RESULT line."""
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    sys.exit(f"{spec['side']} run failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")


# ----------------------------------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is warm-up)")
    p.add_argument("--max-length", type=int, default=512, help="bin length (packed) / max row length")
    p.add_argument("--bins", type=int, default=4, help="packed rows (bins) per step")
    p.add_argument("--padded-batch", type=int, default=8, help="rows per step in the padded (unpacked) comparison")
    p.add_argument("--padded", action=argparse.BooleanOptionalAction, default=True,
                   help="also compare without packing (padded batches)")
    p.add_argument("--rows", type=int, default=600, help="chat rows in the dataset")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(json.loads(a.child))

    import torch

    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.WARNING)
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, params = build_model(root, a)
        rows, data = write_rows(root, model_dir, a)
        modes = ["packed"] + (["padded"] if a.padded else [])
        best: dict[tuple[str, str], dict] = {}
        for rep in range(a.repeats):
            for mode in modes:
                sides = ["ours", "trl"] if rep % 2 == 0 else ["trl", "ours"]
                res = {}
                for side in sides:
                    spec = {"side": side, "packed": mode == "packed", "run_dir": str(root / f"{side}_{mode}_{rep}"),
                            "root": str(root), "model_dir": str(model_dir), "rows": str(rows), "steps": a.steps,
                            "max_length": a.max_length, "bins": a.bins, "padded_batch": a.padded_batch, "lr": a.lr,
                            "threads": a.threads}
                    res[side] = r = launch(spec)
                    if (side, mode) not in best or r["tokens_per_s"] > best[(side, mode)]["tokens_per_s"]:
                        best[(side, mode)] = r
                print(f"run {rep} {mode:<6}: " + " | ".join(
                    f"{s} {res[s]['s_per_step']:.3f}s/step {[round(t, 3) for t in res[s]['steps_s']]}"
                    for s in ("ours", "trl")), flush=True)
                same = res["ours"]["dataset_trained_tokens"] == res["trl"]["dataset_trained_tokens"]
                assert same, (f"trained tokens over the dataset differ: ours {res['ours']['dataset_trained_tokens']}"
                              f" vs TRL {res['trl']['dataset_trained_tokens']}")

    print(f"\nSFT throughput on CPU ({a.threads} threads): Qwen3-shaped {params / 1e6:.1f}M params "
          f"(hidden {a.hidden}, {a.layers} layers), fp32, sdpa; {data['rows']} chat rows of "
          f"{data['mean_tokens']:.0f} tokens on average (max {data['max_tokens']}), max_length {a.max_length}; "
          f"{a.steps} steps per run, first dropped, best median of {a.repeats} alternating run(s) per side; "
          f"total {time.time() - t_start:.0f}s\n")
    head = (f"| {'mode':<28} | {'side':<4} | {'rows/step':>9} | {'s/step':>7} | {'(TRL step_begin..end)':>21} | "
            f"{'trained tok/step':>16} | {'trained tok/s':>13} | {'bin fill':>8} | {'step fill':>9} | "
            f"{'peak RSS MB':>11} |")
    print(head)
    print("|" + "|".join("-" * (len(c) + 0) for c in head.split("|")[1:-1]) + "|")
    for mode in modes:
        label = {"packed": f"packed, {a.bins} bins x {a.max_length}", "padded": f"padded, {a.padded_batch} rows"}[mode]
        for side in ("ours", "trl"):
            r = best[(side, mode)]
            fill = f"{100 * r['bin_fill']:7.1f}%" if r["bin_fill"] is not None else f"{'-':>8}"
            inner = f"{r['inner_s']:21.3f}" if side == "trl" else f"{'':>21}"
            print(f"| {label:<28} | {side:<4} | {r['rows_per_step']:>9} | {r['s_per_step']:7.3f} | {inner} | "
                  f"{r['tokens_per_step']:16.0f} | {r['tokens_per_s']:13.0f} | {fill} | {100 * r['step_fill']:8.1f}% | "
                  f"{r['rss_mb']:11.0f} |")
    print()
    for mode in modes:
        o, t = best[("ours", mode)], best[("trl", mode)]
        print(f"  {mode}: ratio ours / TRL trained tokens/s = {o['tokens_per_s'] / t['tokens_per_s']:.2f}x"
              + ("   (target >= 1.0; our packing efficiency target >= 95%: "
                 f"{100 * o['bin_fill']:.1f}%)" if mode == "packed" else ""))


if __name__ == "__main__":
    main()
