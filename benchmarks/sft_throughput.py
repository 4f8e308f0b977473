"""SFT training throughput on CPU: ``stage=sft`` against TRL's ``SFTTrainer``, same work in both.

    python benchmarks/sft_throughput.py                  # 10M-param model, 4 bins x 512 tokens, 6 steps, 2 repeats
    python benchmarks/sft_throughput.py --steps 4 --repeats 1 --no-padded          # quick check, packed row only
    python benchmarks/sft_throughput.py --hidden 512 --intermediate 1408 --bins 2 --max-length 1024 --repeats 3

Identical in both runs:
  * model: a Qwen3-shaped model built from the tiny config (``--hidden``/``--intermediate``/``--layers``, heads of
    64; 10.3M parameters by default, so that compute dominates), saved to a temp dir and loaded by path
    (``model.name_or_path=<path>``; TRL gets the path, as a user would give it); fp32, torch sdpa attention (ours
    through its default ``sdpa_varlen`` wrapper, see below; ``--ours-attn sdpa`` for plain sdpa), no gradient
    checkpointing, the same number of torch threads;
  * data: the same jsonl of chat rows (``messages``: user + assistant, a quarter of them two turns), of roughly
    log-uniform lengths from ~30 tokens up to ``--max-length`` (none longer, so neither side drops or truncates a
    row), read by ours through ``data.sources=[{path: ...}]`` and by TRL through ``load_dataset("json")``;
  * batches: TRL gets the rows in our mixture's order (``shuffle(seed=0)``) and a sampler that yields our epoch
    permutation, and both pack best-fit-decreasing, so every step trains on the same bins (rows) on both sides;
    the script warns if the trained tokens of any step differ;
  * loss: assistant-only through the tokenizer's chat template, whose ``{% generation %}`` markers give the mask
    in both (TRL ``assistant_only_loss=True`` on ``messages``, the fair equivalent of our rule: every assistant turn
    and its ``<|im_end|>`` trained; ``completion_only_loss`` would train only a last turn); the script asserts that
    both sides train the same number of tokens over the dataset; token-mean cross-entropy over the step;
  * packing: best-fit-decreasing into ``--max-length`` bins (TRL ``packing=True, packing_strategy="bfd"``, its
    default), position ids restarting per document and no attention across documents; ``--bins`` bins per
    optimizer step in one micro-batch (gradient accumulation 1);
  * padded row (``--padded``, on by default): ``data.packing=false`` / ``packing=False``, ``--padded-batch`` rows
    per step, right-padded to the longest row of the batch, with an attention mask;
  * optimizer: AdamW (torch's, non-fused: TRL ``optim="adamw_torch"``), betas (0.9, 0.95), weight decay 0.1,
    constant LR, no warmup, gradient clipping at 1.0, one optimizer step per step.
How the work differs, by each framework's design: TRL's bfd packing is padding-free, i.e. it concatenates the
step's bins into a single row ``[1, bins x max_length]``; on CPU sdpa, transformers turns its position ids into a
dense block-diagonal mask over that whole row, so attention costs ``(bins x L)^2`` against our ``bins x L^2``
(``[bins, L]`` rows, each with its own block-diagonal mask). With ``--bins 1`` the two layouts coincide. Ours, with
its default attention (``sdpa_varlen``), flattens every micro-batch, packed or padded mode, into one row without
padding and runs sdpa one document at a time (``L_i^2`` each, no mask); TRL's padded mode runs ``[rows, longest]``
with pads and a mask. TRL also computes entropy and token accuracy every step; ours computes log-probs through a
chunked lm_head over the trained tokens only.

Each (side, mode) runs in its own long-lived Python process (imports once, a fresh trainer and model per run), so
the peak RSS is per side and neither inherits the other's allocator state. A step is timed end to end: from the end
of the previous step to the end of this one (data fetch, collation, forward, backward, clipping, optimizer step,
logging). Ours: consecutive ``time`` stamps of the step records in ``metrics.jsonl`` (``stage.logging_steps=1``);
TRL: consecutive ``on_step_end`` callbacks. The first step of each run (warm-up) therefore has no time and is
dropped; the median of the rest is taken, and trained tokens/s is the median over the same steps of (loss-carrying
tokens of the step / its seconds). "inner" is ours' own ``tokens_per_s`` window (collation..optimizer step) and
TRL's ``on_step_begin``..``on_step_end`` (forward..optimizer step, without the data fetch); "CPU" is the process
CPU time over the end-to-end span. With ``--repeats`` the runs alternate (order flipped each repeat) and the best
median of each side is kept, which makes the ratio robust to other load on the machine. Workers run with
``OMP_WAIT_POLICY=PASSIVE`` unless it is set: with spinning OpenMP threads, other load on a 2-core machine made
random steps up to 10x slower (3.4 s instead of 0.3 s), on either side. Packing efficiency: bin fill = non-pad
tokens / (bins x max_length) over the packed dataset; step fill = non-pad tokens / slots of the tensors fed to the
model in the timed steps (TRL's padding-free row has no pad slots, but see its attention cost above).
"""

from __future__ import annotations

import argparse
import importlib
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
# OpenMP threads that spin while a sibling is descheduled make a step on a busy 2-core machine up to 10x slower at
# random; sleeping instead keeps the comparison stable (the same for both sides; set the variable to override)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
        max_position_embeddings=max(4096, a.max_length)))
    path = root / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, sum(p.numel() for p in model.parameters())


def write_rows(root: Path, model_dir: Path, a) -> tuple[Path, dict]:
    """Chat rows whose templated length is log-uniform in [~30, max_length] tokens; none longer than max_length."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(0)

    def text(words: int) -> str:  # ~2 tokens per word
        return " ".join(rng.choice(WORDS) for _ in range(max(1, words)))

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


def step_stats(wall_ends: list[float], cpu_ends: list[float], tokens: list[int]) -> dict:
    """Steps 2..n (the first, warm-up, has no previous end): median seconds per step, wall and process CPU, and
    the median of trained tokens / wall seconds."""
    wall = [b - e for e, b in zip(wall_ends, wall_ends[1:])]
    cpu = [b - e for e, b in zip(cpu_ends, cpu_ends[1:])]
    return {"s_per_step": statistics.median(wall), "cpu_s_per_step": statistics.median(cpu),
            "tokens_per_s": statistics.median(t / d for t, d in zip(tokens[1:], wall)),
            "tokens_per_cpu_s": statistics.median(t / d for t, d in zip(tokens[1:], cpu)), "tokens": tokens,
            "steps_s": wall, "tokens_per_step": statistics.mean(tokens[1:])}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ------------------------------------------------------------------------------------------------ one run each
def ours(spec: dict) -> dict:
    import torch

    from stagewise.hydra_config import compose
    from stagewise.stages import sft

    run_dir, packed = Path(spec["run_dir"]), spec["packed"]
    batch = spec["bins"] if packed else spec["padded_batch"]
    cfg = compose([
        "stage=sft", "algorithm=sft", f"model.name_or_path={spec['model_dir']}", "model.dtype=float32",
        f"model.attn_implementation={spec['ours_attn']}", f"data.sources=[{{path: {spec['rows']}}}]",
        "data.eval_sources=[]",
        f"data.max_length={spec['max_length']}", f"data.packing={str(packed).lower()}",
        f"data.cache_dir={Path(spec['root']) / 'cache'}", f"stage.max_steps={spec['steps']}",
        f"stage.learning_rate={spec['lr']}", "stage.lr_scheduler=constant", "stage.warmup_ratio=0",
        "stage.weight_decay=0.1", "stage.adam_beta1=0.9", "stage.adam_beta2=0.95", "stage.max_grad_norm=1.0",
        "stage.logging_steps=1", "stage.save_steps=0", "stage.eval_steps=0", f"hardware.per_device_batch_size={batch}",
        "hardware.grad_accum_steps=1", "hardware.gradient_checkpointing=false", "logger.sinks=[jsonl]",
        "logger.progress_bar=false", f"paths.output_dir={run_dir}", f"run_dir={run_dir}",
    ])

    # instrumentation only (an integer sum per batch, a clock read per step): the same collator and tracker
    fed: list[tuple[int, int]] = []  # (non-pad tokens, slots) of each collated micro-batch
    cpu_ends: list[float] = []  # process CPU time when each step record is written (next to its `time` stamp)
    collator, tracker = sft.SFTCollator, sft.Tracker

    class CountingCollator(collator):
        def __call__(self, items):
            out = super().__call__(items)
            fed.append((sum(len(it["input_ids"]) for it in items), out["input_ids"].numel()))
            return out

    class CpuStampingTracker(tracker):
        def log(self, metrics, step):
            super().log(metrics, step)
            if "trained_tokens" in metrics:
                cpu_ends.append(time.process_time())

    sft.SFTCollator, sft.Tracker = CountingCollator, CpuStampingTracker
    try:
        sft.run(cfg)
    finally:
        sft.SFTCollator, sft.Tracker = collator, tracker
    records = [json.loads(l) for l in open(run_dir / "metrics.jsonl")]
    data = {k: v for r in records for k, v in r.items() if k.startswith("data/")}
    steps = [r for r in records if "trained_tokens" in r]
    assert len(steps) == len(fed) == len(cpu_ends) == spec["steps"], (len(steps), len(fed), len(cpu_ends))
    inner = [r["trained_tokens"] / r["tokens_per_s"] for r in steps]  # the stage's own window: collation..update
    return {**step_stats([r["time"] for r in steps], cpu_ends, [r["trained_tokens"] for r in steps]),
            "inner_s": statistics.median(inner[1:]), "dataset_trained_tokens": data.get("data/trained_tokens"),
            "bin_fill": data.get("data/packing_efficiency"),
            "step_fill": sum(t for t, _ in fed[1:]) / max(1, sum(s for _, s in fed[1:])),
            "rows_per_step": batch, "threads": torch.get_num_threads(), "rss_mb": peak_rss_mb()}


def trl(spec: dict) -> dict:
    import numpy as np
    import torch
    from datasets import load_dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    packed = spec["packed"]
    batch = spec["bins"] if packed else spec["padded_batch"]
    wall_ends: list[float] = []
    cpu_ends: list[float] = []
    inner: list[float] = []
    fed: list[tuple[int, int, int]] = []  # (trained tokens, non-pad tokens, slots) of each micro-batch

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            wall_ends.append(time.perf_counter())
            cpu_ends.append(time.process_time())
            inner.append(wall_ends[-1] - self.t0)

    class CountingSFTTrainer(SFTTrainer):
        def _get_train_sampler(self, train_dataset=None):
            # our data order (= stagewise.stages.sft.epoch_order(n, seed 0, epoch 0)), so that the batches match
            n = len(train_dataset if train_dataset is not None else self.train_dataset)
            return np.random.default_rng([0, 0]).permutation(n).tolist()

        def compute_loss(self, model, inputs, *args, **kwargs):
            if model.training:
                ids, mask = inputs["input_ids"], inputs.get("attention_mask")
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
    # the rows in our mixture's order (a single source is shuffled with data.seed=0)
    rows = load_dataset("json", data_files=spec["rows"], split="train").shuffle(seed=0)
    trainer = CountingSFTTrainer(model=spec["model_dir"], args=args, train_dataset=rows, processing_class=tok)
    assert trainer.model.config._attn_implementation == "sdpa", trainer.model.config._attn_implementation
    assert trainer.model.dtype == torch.float32, trainer.model.dtype
    ds = trainer.train_dataset
    trained = sum(sum(t != IGNORE_INDEX for t in labels) for labels in ds["labels"])
    bin_fill = sum(sum(s) for s in ds["seq_lengths"]) / (len(ds) * spec["max_length"]) if packed else None
    trainer.add_callback(StepTimer())
    trainer.train()
    assert len(wall_ends) == len(fed) == spec["steps"], (len(wall_ends), len(fed))
    return {**step_stats(wall_ends, cpu_ends, [t for t, _, _ in fed]), "inner_s": statistics.median(inner[1:]),
            "dataset_trained_tokens": trained, "bin_fill": bin_fill,
            "step_fill": sum(n for _, n, _ in fed[1:]) / max(1, sum(s for _, _, s in fed[1:])),
            "rows_per_step": batch, "threads": torch.get_num_threads(), "rss_mb": peak_rss_mb()}


def worker(side: str, threads: int) -> None:
    """A long-lived process for one (side, mode): imports once, then runs each spec read from stdin."""
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    for name in ("stagewise", "transformers", "trl", "datasets", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    for module in ["stagewise.stages.sft", "hydra"] if side == "ours" else ["trl.trainer.sft_trainer"]:
        importlib.import_module(module)  # the imports, done before the parent starts any run
    run = ours if side == "ours" else trl
    print("READY", flush=True)
    for line in sys.stdin:
        print("RESULT " + json.dumps(run(json.loads(line))), flush=True)


class Worker:
    """The parent's handle on a `worker` process; its stderr goes to a log file shown if a run fails."""

    def __init__(self, side: str, threads: int, log_path: Path):
        self.side, self.log_path = side, log_path
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", side, "--threads", str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log_path, "w"),
                                     text=True)

    def ready(self) -> None:
        self._read("READY")

    def run(self, spec: dict) -> dict:
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._read("RESULT "))

    def _read(self, prefix: str) -> str:
        other = []
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix):]
            other.append(line)
        sys.exit(f"{self.side} worker failed (exit {self.proc.wait()}):\n{''.join(other)[-4000:]}\n"
                 f"{self.log_path.read_text()[-8000:]}")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


# ----------------------------------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is warm-up)")
    p.add_argument("--max-length", type=int, default=512, help="bin length (packed) / longest row")
    p.add_argument("--bins", type=int, default=4, help="packed rows (bins) per step")
    p.add_argument("--padded-batch", type=int, default=8, help="rows per step in the padded (unpacked) comparison")
    p.add_argument("--padded", action=argparse.BooleanOptionalAction, default=True,
                   help="also compare without packing (padded batches)")
    p.add_argument("--rows", type=int, default=600, help="chat rows in the dataset")
    p.add_argument("--hidden", type=int, default=384, help="a multiple of 128 (heads of 64, 2 KV heads)")
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--ours-attn", default="auto", help="our model.attn_implementation: auto (our default; "
                   "sdpa_varlen on CPU) or sdpa (TRL's, padded rows with a mask)")
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a.worker, a.threads)

    import torch

    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.WARNING)
    t_start = time.time()
    modes = ["packed"] + (["padded"] if a.padded else [])
    results: dict[tuple[str, str], list[dict]] = {(s, m): [] for s in ("ours", "trl") for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, params = build_model(root, a)
        rows, data = write_rows(root, model_dir, a)
        workers = {key: Worker(key[0], a.threads, root / f"{key[0]}_{key[1]}.log") for key in results}
        try:
            for w in workers.values():  # all imports done before any timed step
                w.ready()
            load_before = os.getloadavg()[0]
            for rep in range(a.repeats):
                for mode in modes:
                    res = {}
                    for side in ["ours", "trl"] if rep % 2 == 0 else ["trl", "ours"]:
                        res[side] = workers[(side, mode)].run({
                            "packed": mode == "packed", "run_dir": str(root / f"{side}_{mode}_{rep}"),
                            "root": str(root), "model_dir": str(model_dir), "rows": str(rows), "steps": a.steps,
                            "max_length": a.max_length, "bins": a.bins, "padded_batch": a.padded_batch, "lr": a.lr,
                            "ours_attn": a.ours_attn})
                        results[(side, mode)].append(res[side])
                    print(f"run {rep} {mode}: " + " | ".join(
                        f"{s} {res[s]['s_per_step']:.3f}s/step {[round(t, 3) for t in res[s]['steps_s']]}"
                        for s in ("ours", "trl")), flush=True)
                    n_ours, n_trl = res["ours"]["dataset_trained_tokens"], res["trl"]["dataset_trained_tokens"]
                    assert n_ours == n_trl, f"trained tokens over the dataset differ: ours {n_ours}, TRL {n_trl}"
                    assert res["ours"]["threads"] == res["trl"]["threads"] == a.threads
                    if res["ours"]["tokens"] != res["trl"]["tokens"]:
                        print(f"  warning: the {mode} batches differ; trained tokens per step: ours "
                              f"{res['ours']['tokens']}, TRL {res['trl']['tokens']}", flush=True)
            load_after = os.getloadavg()[0]
        finally:
            for w in workers.values():
                w.close()

    print(f"\nSFT throughput on CPU ({a.threads} threads): Qwen3-shaped model, {params / 1e6:.1f}M params "
          f"(hidden {a.hidden}, {a.layers} layers), fp32, sdpa (ours: {a.ours_attn}); {data['rows']} chat rows, {data['mean_tokens']:.0f} "
          f"tokens on average (max {data['max_tokens']}); {a.steps} steps per run, the first dropped; best median of "
          f"{a.repeats} alternating run(s) per side; {n_ours} trained tokens in the dataset on both sides; "
          f"total {time.time() - t_start:.0f} s; load average {load_before:.1f} before the runs, {load_after:.1f} "
          f"after, on {os.cpu_count()} CPUs\n")
    cols = ["mode", "side", "rows/step", "s/step", "inner s/step", "CPU s/step", "trained tok/step", "trained tok/s",
            "bin fill", "step fill", "peak RSS MB"]
    best, table = {}, []
    for mode in modes:
        label = f"packed, {a.bins} bins x {a.max_length}" if mode == "packed" else f"padded, {a.padded_batch} rows"
        for side in ("ours", "trl"):
            rs = results[(side, mode)]
            b = best[(side, mode)] = {
                "s": min(r["s_per_step"] for r in rs), "inner": min(r["inner_s"] for r in rs),
                "cpu": min(r["cpu_s_per_step"] for r in rs), "tps": max(r["tokens_per_s"] for r in rs),
                "tpcpu": max(r["tokens_per_cpu_s"] for r in rs)}
            fill = f"{100 * rs[0]['bin_fill']:.1f}%" if rs[0]["bin_fill"] is not None else "-"
            table.append([label, side, rs[0]["rows_per_step"], f"{b['s']:.3f}", f"{b['inner']:.3f}",
                          f"{b['cpu']:.3f}", f"{statistics.mean(r['tokens_per_step'] for r in rs):.0f}",
                          f"{b['tps']:.0f}", fill, f"{100 * statistics.mean(r['step_fill'] for r in rs):.1f}%",
                          f"{max(r['rss_mb'] for r in rs):.0f}"])
    widths = [max(len(str(c)) for c in col) for col in zip(cols, *table)]
    for i, row in enumerate([cols, None, *table]):
        if row is None:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
            continue
        print("| " + " | ".join(str(c).ljust(w) if j < 2 or i == 0 else str(c).rjust(w)
                                for j, (c, w) in enumerate(zip(row, widths))) + " |")
    print()
    for mode in modes:
        o, t = best[("ours", mode)], best[("trl", mode)]
        note = (f"   (target >= 1.0; our packing efficiency {100 * results[('ours', mode)][0]['bin_fill']:.1f}%, "
                "target >= 95%)") if mode == "packed" else ""
        print(f"  {mode}: ratio ours / TRL trained tokens/s = {o['tps'] / t['tps']:.2f}x wall-clock, "
              f"{o['tpcpu'] / t['tpcpu']:.2f}x per CPU-second{note}")


if __name__ == "__main__":
    main()
