"""Which generation engine, measured: ``rollout=hf`` (transformers ``generate``) against ``rollout=vllm`` (the
colocated vLLM engine; on CPU, vLLM's CPU build) on the same model, prompts and sampling, in one process.

    python benchmarks/rollout_engines.py                          # the default run's GRPO batch: 32 x 8, 40 tokens
    python benchmarks/rollout_engines.py --prompts 8 --n 8 --max-new-tokens 256 --threads 1
    python benchmarks/rollout_engines.py --hidden 512 --layers 8  # a larger tiny-architecture model

Every completion is exactly ``--max-new-tokens`` long (``ignore_eos``), so both engines produce the same number of
tokens and tokens/s compares like with like. Per engine: the build (vLLM: start-up, model load, KV cache), one
warm-up generation, then ``--repeats`` timed generations (median), and for vLLM the weight push that follows every
optimizer step (median of ``--repeats`` pushes, after a perturbation of every weight). The last column is the
speed-up over ``rollout=hf`` on the same batch. Absolute seconds on a shared machine are noise; the ratio is the
result (benchmarks/README.md keeps dated tables).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engines", nargs="+", default=["hf", "vllm"], choices=["hf", "vllm"])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--hidden", type=int, default=None, help="tiny model hidden size (default: model.tiny's)")
    p.add_argument("--layers", type=int, default=None, help="tiny model layers (default: model.tiny's)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return p.parse_args(argv)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from stagewise.hydra_config import compose
    from stagewise.rollout import SamplingParams, build_rollout

    if args.threads:
        torch.set_num_threads(args.threads)
    shape = []
    if args.hidden:
        heads = args.hidden // 32  # head size 32 (one vLLM's CPU attention has), grouped-query attention 2:1
        shape += [f"model.tiny.hidden_size={args.hidden}", f"model.tiny.num_attention_heads={heads}",
                  f"model.tiny.num_key_value_heads={max(1, heads // 2)}",
                  f"model.tiny.intermediate_size={args.hidden * 8 // 3}"]
    if args.layers:
        shape += [f"model.tiny.num_hidden_layers={args.layers}"]
    from stagewise.models import load_model_and_tokenizer

    sampling = SamplingParams(n=args.n, temperature=1.0, max_new_tokens=args.max_new_tokens, ignore_eos=True)
    rows, base = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for engine in args.engines:
            cfg = compose(["stage=grpo", "data=tiny_arithmetic", "reward=tiny", f"rollout={engine}",
                           f"rollout.n={args.n}", f"rollout.max_new_tokens={args.max_new_tokens}",
                           f"rollout.batch_size={args.prompts * args.n}", *shape])
            policy, tok = load_model_and_tokenizer(cfg.model)
            prompts = [tok(f"Compute {k} + {k + 3} + {2 * k} + 7 =", add_special_tokens=False)["input_ids"]
                       for k in range(args.prompts)]
            build_s, backend = timed(lambda: build_rollout(cfg, policy, tok, run_dir=Path(tmp) / engine,
                                                           return_logprobs=engine != "hf"))
            backend.generate(prompts, sampling)  # warm-up
            gen = [timed(lambda: backend.generate(prompts, sampling))[0] for _ in range(args.repeats)]
            push = []
            if engine != "hf":
                for _ in range(args.repeats):
                    with torch.no_grad():
                        for p in policy.parameters():
                            p.mul_(1.0001)
                    push.append(timed(lambda: backend.sync_weights(policy))[0])
            backend.close()
            tokens = args.prompts * args.n * args.max_new_tokens
            median = statistics.median(gen)
            base = base or (median if engine == "hf" else None)
            rows.append((engine, build_s, median, tokens / median, statistics.median(push) if push else None,
                         base / median if base else None))
    params = sum(p.numel() for p in policy.parameters())
    print(f"\n{args.prompts} prompts x {args.n} samples x {args.max_new_tokens} tokens, {params / 1e6:.2f}M "
          f"parameters, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores, "
          f"{'CUDA' if torch.cuda.is_available() else 'CPU'}\n")
    print("| engine | build (s) | generate (s, median) | tokens/s | weight push (s) | speed-up vs hf |")
    print("|---|---|---|---|---|---|")
    for engine, build_s, median, tps, push, ratio in rows:
        print(f"| {engine} | {build_s:.1f} | {median:.2f} | {tps:,.0f} | {'-' if push is None else f'{push:.3f}'} | "
              f"{'-' if ratio is None else f'{ratio:.2f}x'} |")


if __name__ == "__main__":
    main()
