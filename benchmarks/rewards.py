"""Reward throughput: completions scored per second for ``accuracy`` and ``boxed_math``.

    python benchmarks/rewards.py                 # 1,000 mixed completions, workers = CPU count
    python benchmarks/rewards.py --n 4000 --workers 16 --repeats 5

Baseline: math-verify called serially, ``verify(parse(gold), parse(completion))`` in one loop, as open-r1's
``accuracy_reward`` and TRL-style scripts do. Ours: the serial ``fn(completions, **columns)`` call, and
``RewardRunner`` (process pool with a hard per-sample timeout) with its pool already started, as in training where
the runner lives for the whole run.

Every row runs in its own fresh Python process on the same seeded batch, after scoring the same small warm-up batch:
sympy and math-verify cache parses per process, so rows sharing a process would flatter whichever runs later. Each
row is repeated (interleaved with the others) and the median is reported, since a shared machine's load drifts. The
batch mixes integers, fractions, radicals, polynomials, tuples, anchors without a box, missing answers, long chains of
thought and empty strings, about half of them correct.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

WORDS = "we add the two terms then simplify and check the result carefully before concluding".split()
ROWS = {
    "baseline": "math-verify, serial (baseline)",
    "accuracy-serial": "accuracy, serial fn() call",
    "accuracy-runner": "accuracy, RewardRunner ({workers} workers)",
    "boxed_math-serial": "boxed_math, serial fn() call",
    "boxed_math-runner": "boxed_math, RewardRunner ({workers} workers)",
}


def reasoning(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def make_batch(n: int, seed: int = 0):
    """(completions, golds): a seeded mix of answer shapes; roughly half correct."""
    rng = random.Random(seed)
    completions, golds = [], []
    for i in range(n):
        kind = i % 10
        right = rng.random() < 0.5
        think = f"<think>{reasoning(rng, rng.randint(20, 120))}</think> "
        a, b = rng.randint(1, 50), rng.randint(2, 60)
        if kind == 0:
            gold, ans = str(a * b), str(a * b if right else a * b + 1)
            text = think + f"So the answer is \\boxed{{{ans}}}."
        elif kind == 1:
            gold = f"\\frac{{{a}}}{{{b}}}"
            text = think + f"The result is \\boxed{{\\frac{{{a}}}{{{b if right else b + 1}}}}}."
        elif kind == 2:
            gold = f"{a}\\sqrt{{{b}}}"
            text = think + f"Hence \\boxed{{{a if right else a + 1}\\sqrt{{{b}}}}}"
        elif kind == 3:
            gold = f"x^2+{2 * a}x+{a * a}"
            text = think + f"Expanding gives \\boxed{{(x+{a if right else a + 1})^2}}"
        elif kind == 4:
            gold = f"({a},{b})"
            text = think + f"The point is \\boxed{{({a},{b if right else -b})}}"
        elif kind == 5:
            gold = str(a)
            text = think + f"The final answer is ${a if right else a + 2}$."
        elif kind == 6:
            gold = str(a)
            text = think + f"I think it is {a}"  # no box, no LaTeX
        elif kind == 7:
            gold = f"{a}.5"
            text = f"<think>{reasoning(rng, 400)}</think> \\boxed{{{a}.5}}" if right else think + f"\\boxed{{{a}}}"
        elif kind == 8:
            gold = str(-a)
            text = think + f"\\boxed{{{-a if right else a}}}"
        else:
            gold, text = str(a), ""
        completions.append(text)
        golds.append(gold)
    return completions, golds


def run_row(row: str, n: int, workers: int, timeout: float) -> dict:
    """One measurement in this (fresh) process: warm up on a small batch, then time the real one."""
    from math_verify import parse, verify

    from stagewise.config import RewardConfig, RewardFnConfig
    from stagewise.rewards import RewardRunner, build

    warm_c, warm_g = make_batch(4 * max(workers, 1), seed=1000)
    completions, golds = make_batch(n, seed=1)
    name = row.split("-")[0]
    runner = None
    if row == "baseline":
        def score(c, g):
            return [float(verify(parse(y), parse(x))) for x, y in zip(c, g)]
    elif row.endswith("serial"):
        fn = build(name)

        def score(c, g):
            return fn(c, answer=g)
    else:
        runner = RewardRunner(RewardConfig(functions=[RewardFnConfig(name=name)], timeout_s=timeout,
                                           num_workers=workers))

        def score(c, g):
            return runner(c, answer=g).per_fn[name]
    start = time.perf_counter()
    score(warm_c, warm_g)  # for the runner: starts the pool, as the first training step would
    warm_s = time.perf_counter() - start
    start = time.perf_counter()
    scores = score(completions, golds)
    seconds = time.perf_counter() - start
    if runner is not None:
        runner.close()
    return {"seconds": seconds, "warm_s": warm_s, "scores": scores}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--row", choices=sorted(ROWS), help=argparse.SUPPRESS)  # internal: one row, JSON out
    args = parser.parse_args()
    if args.row:
        print("RESULT " + json.dumps(run_row(args.row, args.n, args.workers, args.timeout)))
        return

    # Rows are interleaved over the repeats and the median is reported: on a shared machine the load drifts.
    runs = {row: [] for row in ROWS}
    for _ in range(args.repeats):
        for row in ROWS:
            cmd = [sys.executable, __file__, "--row", row, "--n", str(args.n), "--workers", str(args.workers),
                   "--timeout", str(args.timeout)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[row].append(json.loads(out.split("RESULT ", 1)[1]))
    results = {row: sorted(r, key=lambda x: x["seconds"])[len(r) // 2] for row, r in runs.items()}

    base = results["baseline"]["seconds"]
    print(f"{args.n} completions, {os.cpu_count()} CPUs, median of {args.repeats} runs per row "
          f"(load average now {os.getloadavg()[0]:.1f})\n")
    print(f"| {'scorer':<42} | {'completions/s':>13} | {'x baseline':>10} | {'runs (completions/s)':<22} |")
    print(f"| {'-' * 42} | {'-' * 13} | {'-' * 10} | {'-' * 22} |")
    for row, label in ROWS.items():
        r = results[row]
        each = " ".join(f"{args.n / x['seconds']:.0f}" for x in runs[row])
        print(f"| {label.format(workers=args.workers):<42} | {args.n / r['seconds']:>13.1f} | "
              f"{base / r['seconds']:>10.2f} | {each:<22} |")
    for name in ("accuracy", "boxed_math"):
        serial, pooled = results[f"{name}-serial"]["scores"], results[f"{name}-runner"]["scores"]
        same = sum(a == b for a, b in zip(serial, pooled)) / args.n
        print(f"\n{name}: runner and serial call agree on {same:.1%} of samples; pool start-up + warm-up batch "
              f"{results[f'{name}-runner']['warm_s']:.2f}s (not counted)")


if __name__ == "__main__":
    main()
