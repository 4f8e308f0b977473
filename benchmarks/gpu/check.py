"""One-shot GPU check: SFT throughput/MFU and a GRPO step against TRL, one table, no network.

    bash benchmarks/gpu/check.sh                 # one GPU, <= 8 minutes on an H100 (not yet run on a GPU)
    bash benchmarks/gpu/check.sh --dry-run       # CPU, tiny shape, < 1 minute: every path that needs no CUDA
    python benchmarks/gpu/check.py --skip-grpo --sft-steps 4 --json out.json

Model: random-init Qwen2.5-1.5B shape from a ``transformers.Qwen2Config`` (hidden 1536, 28 layers, 12 heads, 2 KV
heads, intermediate 8960, the full 151,936 vocabulary, tied embeddings; 1.54B parameters), saved once to a temp
dir in bf16 with the offline tiny tokenizer (ids < 1028; the model can emit any of its 151,936 ids, they decode to
"\ufffd"). ``--dry-run``: hidden 64, 2 layers, 4 heads, 2 KV heads, intermediate 128, vocabulary 1088 (the tiny
tokenizer's 1028 ids, rounded up to 64), 256-token bins, 2+1 steps, float32, no Liger, ``hardware=cpu``.

Rows (each runs in its own Python process, so Liger's class patches, the CUDA allocator and its peak stay per row):
  * ``sft packed``, ``sft packed + liger``: our SFT step, called as ``stages/sft.py``'s loop calls it, on
    ``hardware=1xgpu`` (bf16; ``--gradient-checkpointing`` off by default, the preset turns it on):
    ``load_model_and_tokenizer`` -> ``prepare_model`` (Liger when ``hardware.use_liger``) -> ``build_optimizer`` /
    ``build_scheduler`` -> ``acc.prepare``; per micro-batch ``SFTCollator.for_model`` over ``PackedDataset`` bins of
    ``--seq`` tokens -> ``micro_batch_loss`` (chunked LM head, or Liger's fused linear cross-entropy; normaliser =
    trained tokens of the step) -> ``backward_micro_batch``; then ``optimizer_step``. Data: a synthetic token stream, documents of
    log-uniform length in [256, seq] with uniform random ids over the whole vocabulary, the first 10% of each
    document untrained (a "prompt"), best-fit-decreasing packed. One micro-batch = one bin (``--seq`` tokens),
    ``--accum`` micro-batches per optimizer step. The Liger row says "not installed" when ``liger_kernel`` does not
    import (and is skipped on CPU); with Liger, RMSNorm/SwiGLU/RoPE are patched and the loss is its fused linear
    cross-entropy.
  * ``grpo ours (hf|vllm)`` vs ``grpo trl (hf|vllm)``: ``stage=grpo`` (``stagewise.stages.grpo.run``) against TRL's
    ``GRPOTrainer`` with the same saved model (loaded by path on both sides), the same rendered prompts, group size,
    completion length, sampling (temperature 1, top-p 1, top-k 0), reward (``benchmarks/grpo_step.py``'s
    digit_fraction), loss (GRPO seq-mean token-mean, group-std advantages, beta 0), LR, bf16, attention
    implementation, gradient checkpointing, no Liger, one optimizer step per step over the whole batch in one
    micro-batch. Seconds/step: ours from ``metrics.jsonl`` ``time/step``, TRL from a callback around each Trainer
    step (as ``benchmarks/grpo_step.py``); the first step is dropped, the median of the rest kept. The vLLM pair
    (``rollout=vllm`` colocated, ``use_vllm=True, vllm_mode="colocate"``, both at gpu_memory_utilization 0.35) runs
    only when ``vllm`` imports. Ratio = TRL s/step / ours s/step.

Numbers:
  * tokens/s (SFT) = non-pad input tokens of the timed optimizer steps / their wall seconds (CUDA synchronised).
  * MFU = 6 * N * tokens/s / peak, N = all parameters (embedding counted once: tied, it is also the LM-head matmul),
    peak = dense bf16 tensor FLOP/s of the device: H100 SXM 989e12, H100 PCIe 756e12, H100 NVL 835e12, H200 989e12,
    A100 312e12 (``--peak-tflops`` overrides; an unknown device gives "n/a"). Model FLOPs, not hardware FLOPs:
    checkpointing's recompute and the chunked LM head's recompute are not counted. "n/a" on CPU.
  * MFU+attn adds causal attention within each packed document: per step
    ``12 * layers * heads * head_dim * sum_docs L_d (L_d + 1) / 2`` (QK^T and AV, 2 * head_dim FLOPs per head per
    query-key pair each, x3 for forward + backward), i.e. PaLM's ``12 * l * h * q * T`` per token halved for a
    causal mask and taken per document.
  * peak GiB = ``torch.cuda.max_memory_allocated()`` of the row's process (reset after the model is built, so it
    includes weights, optimizer states and activations). For vLLM rows it is this process's PyTorch allocations
    only (vLLM's KV cache pool is allocated through PyTorch too when the engine runs in-process, not otherwise).
    "n/a" on CPU.
Targets (this project's goals): SFT MFU >= 35% (goal 45%); GRPO step >= 1.3x TRL.

Wheels a bare CUDA + PyTorch image (e.g. ``pytorch/pytorch:2.x-cuda12.x-runtime``, which has torch, numpy, triton)
lacks and this check needs, with the versions this checkout is tested with:
    transformers==5.20.2 tokenizers==0.23.3 safetensors==0.8.0 huggingface-hub accelerate==1.16.0 peft==0.21.2
    datasets==5.2.0 pyarrow==26.0.1 pandas hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3
    trl==1.16.0 math-verify==0.9.0 sympy==1.14.0 tqdm pyyaml regex requests dill xxhash multiprocess fsspec
    (the rest of trl's/datasets' own dependencies come with them), deepspeed==0.19.8 (imported by our accelerator
    module), and optionally liger-kernel>=0.6 (the Liger row), flash-attn>=2.7 (its varlen kernel in our packed
    rows, TRL's flash_attention_2; else sdpa), vllm>=0.30,<0.34 (the vLLM pair; large, with its own torch pin: only if the image's torch matches).
Carry them as a wheels folder, downloaded where there is network for the image's Python and platform:
    pip download -d wheels/ --only-binary=:all: --python-version 3.11 --platform manylinux2014_x86_64 \\
        -r <(python -c "import tomllib; print('\\n'.join(tomllib.load(open('pyproject.toml','rb'))['project']\\
['dependencies']))" | grep -v '^torch') trl==1.16.0 'liger-kernel>=0.6' setuptools wheel
(the torch line is left out: the image's torch is kept; liger-kernel's wheel is small and pure Python + Triton), and
on the GPU machine, with no network:
    pip install --no-index --find-links wheels/ --no-build-isolation -e . trl liger-kernel
(``check.sh`` does the last step itself when a ``wheels/`` folder is next to the repository root or named by
``STAGEWISE_WHEELS``.) The check needs nothing else from the network: model and data are built locally, and
HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE/HF_DATASETS_OFFLINE are set.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))
for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

# dense bf16 tensor-core peak, FLOP/s, by a substring of torch.cuda.get_device_name() (first match wins)
PEAK_BF16 = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
             ("A100", 312e12)]

GPU_SHAPE = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151936)
DRY_SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=1088)

SFT_ROWS = [("sft packed", False), ("sft packed + liger", True)]


def peak_flops(device_name: str) -> float | None:
    for key, flops in PEAK_BF16:
        if key in device_name:
            return flops
    return None


# ------------------------------------------------------------------------------------------------ the model
def build_model(root: Path, shape: dict, dtype: str, max_positions: int, device: str) -> Path:
    """A random-init Qwen2 model of ``shape`` (tied embeddings) and the tiny tokenizer, saved for loading by path."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from stagewise.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer(False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    assert len(tok) <= shape["vocab_size"], (len(tok), shape["vocab_size"])
    config = Qwen2Config(**shape, tie_word_embeddings=True, max_position_embeddings=max(32768, max_positions),
                         rope_theta=1e6, rms_norm_eps=1e-6, bos_token_id=tok.eos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, use_cache=True)
    torch.manual_seed(0)
    with torch.device(device):  # init on the GPU: seconds instead of a minute on the CPU
        model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    path = root / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def attn_implementation() -> str:
    from stagewise.models.loading import resolve_attn_implementation

    return resolve_attn_implementation("auto")  # sdpa_varlen


def cuda_peak_gib(dry_run: bool) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() and not dry_run else None


# ----------------------------------------------------------------------------------------------------- SFT
def synthetic_bins(n_bins: int, seq: int, vocab: int, seed: int = 0):
    """A ``PackedDataset`` of at least ``n_bins`` bins over random-token documents (see the module docstring)."""
    from datasets import Dataset

    from stagewise.data import PackedDataset

    rng = random.Random(seed)
    ids, masks, lengths, total = [], [], [], 0
    lo = min(256, seq // 4)
    while total < n_bins * seq * 1.02 + seq:
        n = int(math.exp(rng.uniform(math.log(lo), math.log(seq))))
        prompt = max(1, n // 10)
        ids.append([rng.randrange(vocab) for _ in range(n)])
        masks.append([0] * prompt + [1] * (n - prompt))
        lengths.append(n)
        total += n
    packed = PackedDataset(Dataset.from_dict({"input_ids": ids, "loss_mask": masks, "length": lengths}), seq)
    assert len(packed) >= n_bins, (len(packed), n_bins)
    return packed


def sft_row(spec: dict) -> dict:
    import torch

    from stagewise.hydra_config import compose
    from stagewise.data import SFTCollator
    from stagewise.models import load_model_and_tokenizer
    from stagewise.stages.sft import acc_to_device, micro_batch_loss, trained_targets
    from stagewise.training import (backward_micro_batch, build_accelerator, build_optimizer, build_scheduler,
                                    optimizer_step, prepare_model, set_seed)
    from stagewise.training.modeling import liger_usable

    dry, steps, accum, seq = spec["dry_run"], spec["steps"], spec["accum"], spec["seq"]
    cfg = compose([
        "stage=sft", "algorithm=sft", f"hardware={'cpu' if dry else '1xgpu'}",
        f"model.name_or_path={spec['model_dir']}", f"model.dtype={'float32' if dry else 'bfloat16'}",
        f"model.attn_implementation={spec['attn']}", f"data.max_length={seq}", "data.packing=true",
        f"hardware.use_liger={str(spec['liger']).lower()}",
        f"hardware.gradient_checkpointing={str(spec['gradient_checkpointing']).lower()}",
        "hardware.per_device_batch_size=1", f"hardware.grad_accum_steps={accum}", f"stage.max_steps={steps}",
        "stage.lr_scheduler=constant", "stage.warmup_ratio=0", "stage.learning_rate=1e-5", "stage.max_grad_norm=1.0",
    ])
    set_seed(cfg.seed)
    acc = build_accelerator(cfg.hardware, cfg.stage.max_grad_norm, accum)
    model, tok = load_model_and_tokenizer(cfg.model)
    model = prepare_model(model, cfg.model.lora, cfg.hardware)
    liger = spec["liger"] and liger_usable()  # kernels patched by prepare_model, the fused loss in micro_batch_loss
    collate = SFTCollator.for_model(model, tok.pad_token_id)
    params = sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(model, cfg.stage)
    scheduler = build_scheduler(optimizer, cfg.stage, steps)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    data = synthetic_bins(steps * accum, seq, model.config.vocab_size if hasattr(model, "config")
                          else acc.unwrap_model(model).config.vocab_size)
    model.train()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    times, tokens, pairs, losses = [], [], [], []
    for step in range(steps):
        t0 = time.perf_counter()
        bins = [data[step * accum + k] for k in range(accum)]
        # the loop body of stagewise.stages.sft.run on one process (world size 1)
        batches = [acc_to_device(collate([b]), acc.device) for b in bins]
        step_tokens = sum(int(trained_targets(b).sum()) for b in batches)
        step_loss = torch.zeros((), device=acc.device)
        for k, batch in enumerate(batches):
            loss = micro_batch_loss(model, batch, step_tokens, cfg.hardware.logprob_chunk_size, liger)
            backward_micro_batch(acc, model, loss, last=k == len(batches) - 1)
            step_loss += loss.detach()
        optimizer_step(acc, model, optimizer, scheduler, cfg.stage.max_grad_norm)
        losses.append(float(step_loss))  # a host sync
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        tokens.append(sum(len(b["input_ids"]) for b in bins))
        docs = [n for b in bins for n in doc_lengths(b["position_ids"])]
        pairs.append(sum(n * (n + 1) // 2 for n in docs))
    timed = slice(1, None) if steps > 1 else slice(None)  # the first step (warm-up) is dropped
    inner = acc.unwrap_model(model)
    c = inner.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return {"s_per_step": statistics.median(times[timed]), "tokens_per_s": sum(tokens[timed]) / sum(times[timed]),
            "tokens_per_step": statistics.mean(tokens[timed]),
            "attn_flops_per_s": 12 * c.num_hidden_layers * c.num_attention_heads * head_dim * sum(pairs[timed])
            / sum(times[timed]),
            "params": params, "liger_applied": liger, "losses": losses, "steps_s": times,
            "attn": inner.config._attn_implementation, "peak_gib": cuda_peak_gib(spec["dry_run"])}


def doc_lengths(position_ids: list[int]) -> list[int]:
    starts = [i for i, p in enumerate(position_ids) if p == 0] + [len(position_ids)]
    return [b - a for a, b in zip(starts, starts[1:])]


# ---------------------------------------------------------------------------------------------------- GRPO
def grpo_ours(spec: dict) -> dict:
    from dataclasses import replace

    import torch

    from stagewise.config import R1_ZERO_SYSTEM_PROMPT
    from stagewise.hydra_config import compose
    from stagewise.data import load_prompt_dataset
    from stagewise.models import load_tokenizer
    from stagewise.stages import grpo

    dry, run_dir, n = spec["dry_run"], Path(spec["run_dir"]), spec["prompts"] * spec["group"]
    reward = f"{REPO / 'benchmarks' / 'grpo_step.py'}:digit_fraction"
    cfg = compose([
        "stage=grpo", "algorithm=grpo", f"hardware={'cpu' if dry else '1xgpu'}", f"rollout={spec['rollout']}",
        f"model.name_or_path={spec['model_dir']}", f"model.dtype={'float32' if dry else 'bfloat16'}",
        f"model.attn_implementation={spec['attn']}", f"data.sources=[{{path: {spec['prompts_path']}}}]",
        "data.eval_sources=[]", "data.max_prompt_length=512", f"stage.prompts_per_step={spec['prompts']}",
        f"stage.max_steps={spec['steps']}", "stage.learning_rate=1e-6", "stage.samples_steps=0",
        "stage.save_steps=0", "stage.logging_steps=1", f"rollout.n={spec['group']}",
        f"rollout.max_new_tokens={spec['length']}", "rollout.temperature=1.0", "rollout.top_p=1.0",
        *([f"rollout.batch_size={n}"] if spec["rollout"] == "hf" else ["rollout.gpu_memory_utilization=0.35"]),
        f"hardware.per_device_batch_size={n}", "hardware.grad_accum_steps=1", "hardware.use_liger=false",
        f"hardware.gradient_checkpointing={str(spec['gradient_checkpointing']).lower()}",
        "logger.sinks=[jsonl]", "logger.progress_bar=false", f"reward.functions=[{{name: '{reward}'}}]",
        f"paths.output_dir={run_dir}", f"run_dir={run_dir}",
    ])
    cfg = replace(cfg, data=replace(cfg.data, system_prompt=R1_ZERO_SYSTEM_PROMPT))  # as the R1-Zero data sets
    grpo.run(cfg)
    records = [json.loads(l) for l in open(run_dir / "metrics.jsonl")]
    steps = [r for r in records if "time/step" in r]
    times = [r["time/step"] for r in steps]
    data = load_prompt_dataset(cfg.data, load_tokenizer(cfg.model))  # what our run rendered
    return {"s_per_step": median_after_warmup(times), "steps_s": times, "texts": list(data.train["prompt"]),
            "mean_length": statistics.mean(r.get("completions/mean_length", float("nan")) for r in steps),
            "phases": {k: statistics.median(r.get(f"time/{k}", 0.0) for r in steps[1:] or steps)
                       for k in ("generate", "score", "logprobs", "update", "sync")},
            "peak_gib": cuda_peak_gib(spec["dry_run"]), "cuda": torch.cuda.is_available()}


def grpo_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpo_step import digit_fraction

    dry, n = spec["dry_run"], spec["prompts"] * spec["group"]
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    vllm = {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.35} \
        if spec["rollout"] == "vllm" else {}
    args = GRPOConfig(
        output_dir=spec["run_dir"], per_device_train_batch_size=n, gradient_accumulation_steps=1,
        num_generations=spec["group"], max_completion_length=spec["length"], num_iterations=1, beta=0.0,
        loss_type="grpo", scale_rewards="group", learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=1.0, weight_decay=0.0, temperature=1.0, top_p=1.0, top_k=0, max_steps=spec["steps"],
        logging_steps=1, report_to="none", save_strategy="no", use_cpu=dry, bf16=not dry, fp16=False, seed=0,
        dataloader_num_workers=0, disable_tqdm=True, log_completions=False,
        gradient_checkpointing=spec["gradient_checkpointing"], use_liger_kernel=False,
        model_init_kwargs={"dtype": "float32" if dry else "bfloat16",  # TRL's default is float32
                           "attn_implementation": spec["attn_trl"]}, **vllm)
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    trainer = GRPOTrainer(model=spec["model_dir"], reward_funcs=[digit_fraction], args=args,
                          train_dataset=Dataset.from_dict({"prompt": list(spec["texts"])}), processing_class=tok)
    trainer.add_callback(StepTimer())
    trainer.train()
    return {"s_per_step": median_after_warmup(times), "steps_s": times, "peak_gib": cuda_peak_gib(spec["dry_run"])}


def median_after_warmup(times: list[float]) -> float:
    return statistics.median(times[1:] if len(times) > 1 else times)


def write_prompts(root: Path, num: int) -> Path:
    from grpo_step import write_prompts as grpo_step_write_prompts

    return grpo_step_write_prompts(root, num)[0]


# --------------------------------------------------------------------------------------- one process per row
WORKERS = {"sft": sft_row, "grpo_ours": grpo_ours, "grpo_trl": grpo_trl}


def worker(kind: str, spec_path: str) -> None:
    logging.basicConfig(level=logging.WARNING)
    for name in ("stagewise", "transformers", "trl", "datasets", "accelerate", "vllm"):
        logging.getLogger(name).setLevel(logging.WARNING)
    spec = json.loads(Path(spec_path).read_text())
    import torch

    if spec["dry_run"]:
        torch.set_num_threads(spec["threads"])
    result = WORKERS[kind](spec)
    print("RESULT " + json.dumps(result), flush=True)


def run_row(kind: str, spec: dict, root: Path, name: str, timeout: float) -> dict:
    """Run one row in a fresh process; a failure or timeout is reported in the row, not raised."""
    spec_path = root / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    log_path = root / f"{name}.log"
    t0 = time.time()
    try:
        with open(log_path, "w") as log_file:
            out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", kind, str(spec_path)],
                                 stdout=subprocess.PIPE, stderr=log_file, text=True, timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[len("RESULT "):])
            res["wall_s"] = time.time() - t0
            return res
    tail = (log_path.read_text()[-3000:] + out.stdout[-1000:]).strip()
    print(f"--- {name} failed (exit {out.returncode}); log tail:\n{tail}\n---", file=sys.stderr, flush=True)
    last = [l for l in tail.splitlines() if l.strip()]
    return {"error": f"exit {out.returncode}: {last[-1][:120] if last else 'no output'}"}


# ----------------------------------------------------------------------------------------------------- main
def fmt(x, spec: str = ".2f", none: str = "n/a") -> str:
    return none if x is None else format(x, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shape, float32, no Liger: < 1 minute")
    p.add_argument("--seq", type=int, help="SFT bin length (default 8192; dry run 256)")
    p.add_argument("--accum", type=int, help="SFT micro-batches (bins) per optimizer step (default 4; dry run 2)")
    p.add_argument("--sft-steps", type=int, help="SFT optimizer steps per row, the first dropped (default 6; dry 3)")
    p.add_argument("--prompts", type=int, help="GRPO prompts per step (default 8; dry run 2)")
    p.add_argument("--group", type=int, help="GRPO samples per prompt (default 8; dry run 2)")
    p.add_argument("--length", type=int, help="GRPO completion tokens (default 256; dry run 8)")
    p.add_argument("--grpo-steps", type=int, help="GRPO steps per side, the first dropped (default 3; dry run 2)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="on in every row (off by default)")
    p.add_argument("--skip-grpo", action="store_true")
    p.add_argument("--skip-vllm", action="store_true", help="no vLLM pair even when vllm imports")
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the device, overrides the table")
    p.add_argument("--budget-s", type=float, default=480, help="rows not started by then are skipped")
    p.add_argument("--threads", type=int, default=1, help="torch threads per row on CPU (dry run)")
    p.add_argument("--json", type=Path, help="also write every row's numbers here")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(*a.worker)

    import torch

    t_start = time.time()
    dry = a.dry_run
    cuda = torch.cuda.is_available() and not dry
    if not dry and not cuda:
        sys.exit("no CUDA device: run with --dry-run on CPU")
    d = (dict(seq=256, accum=2, sft_steps=3, prompts=2, group=2, length=8, grpo_steps=2) if dry else
         dict(seq=8192, accum=4, sft_steps=6, prompts=8, group=8, length=256, grpo_steps=3))
    for k, v in d.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    shape = DRY_SHAPE if dry else GPU_SHAPE
    device = torch.cuda.get_device_name(0) if cuda else "CPU"
    peak = (a.peak_tflops * 1e12 if a.peak_tflops else peak_flops(device)) if cuda else None
    have = {m: importlib.util.find_spec(m) is not None for m in ("liger_kernel", "vllm", "flash_attn", "trl")}
    # ours: our default (sdpa_varlen: packed rows through flash-attention's varlen kernel where it runs, GRPO
    # prompts shared); TRL: flash-attention 2 where installed, else sdpa
    attn_trl = "flash_attention_2" if cuda and have["flash_attn"] else "sdpa"
    attn = f"ours {attn_implementation()}" + (" (flash varlen kernel)" if cuda and have["flash_attn"] else "") + \
        f", TRL {attn_trl}"
    common = {"dry_run": dry, "attn": attn_implementation(), "attn_trl": attn_trl,
              "gradient_checkpointing": a.gradient_checkpointing,
              "threads": a.threads}

    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = build_model(root, shape, "float32" if dry else "bfloat16", a.seq, "cuda" if cuda else "cpu")
        if cuda:
            torch.cuda.empty_cache()

        def left() -> float:
            return a.budget_s - (time.time() - t_start)

        for label, liger in SFT_ROWS:
            row = {"row": label, "kind": "sft"}
            if liger and not have["liger_kernel"]:
                row["note"] = "not installed"
            elif liger and dry:
                row["note"] = "skipped (dry run: Liger needs CUDA)"
            elif left() < 20:
                row["note"] = "skipped (time budget)"
            else:
                row.update(run_row("sft", {**common, "model_dir": str(model_dir), "liger": liger, "seq": a.seq,
                                           "accum": a.accum, "steps": a.sft_steps}, root, label.replace(" ", "_")
                                   .replace("+", "p"), left()))
            rows.append(row)
            print(f"[{time.time() - t_start:5.0f} s] {label}: {summary(row)}", flush=True)

        if not a.skip_grpo:
            prompts_path = write_prompts(root, max(64, a.prompts * (a.grpo_steps + 2)))
            backends = ["hf"] + (["vllm"] if cuda and have["vllm"] and not a.skip_vllm else [])
            for backend in backends:
                spec = {**common, "model_dir": str(model_dir), "prompts_path": str(prompts_path),
                        "rollout": backend, "prompts": a.prompts, "group": a.group, "length": a.length,
                        "steps": a.grpo_steps}
                ours = {"row": f"grpo ours ({backend})", "kind": "grpo"}
                theirs = {"row": f"grpo trl ({backend})", "kind": "grpo"}
                if left() < 30:
                    ours["note"] = theirs["note"] = "skipped (time budget)"
                else:
                    ours.update(run_row("grpo_ours", {**spec, "run_dir": str(root / f"ours_{backend}")}, root,
                                        f"grpo_ours_{backend}", left()))
                    print(f"[{time.time() - t_start:5.0f} s] {ours['row']}: {summary(ours)}", flush=True)
                    if not have["trl"]:
                        theirs["note"] = "trl not installed"
                    elif "texts" not in ours:
                        theirs["note"] = "skipped (ours failed: TRL gets our rendered prompts)"
                    elif left() < 30:
                        theirs["note"] = "skipped (time budget)"
                    else:
                        theirs.update(run_row("grpo_trl", {**spec, "texts": ours["texts"],
                                                           "run_dir": str(root / f"trl_{backend}")}, root,
                                              f"grpo_trl_{backend}", left()))
                    if "s_per_step" in ours and "s_per_step" in theirs:
                        ours["vs_trl"] = theirs["s_per_step"] / ours["s_per_step"]
                ours.pop("texts", None)
                rows.append(ours)
                rows.append(theirs)
                print(f"[{time.time() - t_start:5.0f} s] {theirs['row']}: {summary(theirs)}", flush=True)

    for r in rows:  # MFU from tokens/s
        if r["kind"] == "sft" and "tokens_per_s" in r and peak:
            r["mfu"] = 6 * r["params"] * r["tokens_per_s"] / peak
            r["mfu_attn"] = r["mfu"] + r["attn_flops_per_s"] / peak
    print_table(rows, a, shape, device, peak, attn, time.time() - t_start)
    if a.json:
        a.json.write_text(json.dumps({"device": device, "peak_flops": peak, "shape": shape, "rows": rows}, indent=1))


def summary(row: dict) -> str:
    if "s_per_step" in row:
        return f"{row['s_per_step']:.3f} s/step ({row.get('wall_s', 0):.0f} s wall)"
    return row.get("error") or row.get("note", "")


def print_table(rows: list[dict], a, shape: dict, device: str, peak, attn: str, total_s: float) -> None:
    params = next((r["params"] for r in rows if "params" in r), None)
    print(f"\nGPU check on {device} ({'dry run, ' if a.dry_run else ''}peak bf16 "
          f"{fmt(peak and peak / 1e12, '.0f')} TFLOP/s): Qwen2-shaped random init, hidden {shape['hidden_size']}, "
          f"{shape['num_hidden_layers']} layers, vocab {shape['vocab_size']}, "
          f"{fmt(params and params / 1e6, '.1f')}M params; {'float32' if a.dry_run else 'bf16'}, {attn}, "
          f"gradient checkpointing {'on' if a.gradient_checkpointing else 'off'}; SFT {a.accum} x {a.seq}-token "
          f"packed bins per step, {a.sft_steps} steps; GRPO {a.prompts} prompts x {a.group} samples x {a.length} "
          f"tokens, {a.grpo_steps} steps; first step of each row dropped; {total_s:.0f} s in all\n")
    cols = ["row", "s/step", "tokens/s", "MFU", "MFU+attn", "vs TRL", "peak GiB", "note"]
    table = []
    for r in rows:
        note = r.get("error") or r.get("note", "")
        if r["kind"] == "sft" and "liger_applied" in r and "liger" in r["row"] and not r["liger_applied"]:
            note = "liger requested but not applied"
        table.append([
            r["row"], fmt(r.get("s_per_step"), ".3f", "-"), fmt(r.get("tokens_per_s"), ".0f", "-"),
            (fmt(r.get("mfu") and 100 * r["mfu"], ".1f") + "%") if r.get("mfu") else ("n/a" if "s_per_step" in r
                                                                                         and r["kind"] == "sft" else "-"),
            (fmt(100 * r["mfu_attn"], ".1f") + "%") if r.get("mfu_attn") else ("n/a" if "s_per_step" in r
                                                                                 and r["kind"] == "sft" else "-"),
            fmt(r.get("vs_trl"), ".2f", "-") + ("x" if r.get("vs_trl") else ""),
            fmt(r.get("peak_gib"), ".1f", "n/a" if "s_per_step" in r else "-"), note])
    widths = [max(len(str(c)) for c in col) for col in zip(cols, *table)]
    for i, row in enumerate([cols, None, *table]):
        if row is None:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
            continue
        print("| " + " | ".join(str(c).ljust(w) if j in (0, len(cols) - 1) or i == 0 else str(c).rjust(w)
                                for j, (c, w) in enumerate(zip(row, widths))) + " |")
    print("\nTargets (this project's goals): SFT MFU >= 35% (goal 45%); GRPO step: ours >= 1.3x TRL (the 'vs TRL' "
          "column = TRL s/step / ours s/step).")


if __name__ == "__main__":
    main()
