"""Countdown tasks in TinyZero's format: reach ``target`` from ``nums`` with + - * /, each number used once.

How a task is made: draw ``k`` numbers (``k`` from ``num_numbers``, each uniform in [1, max_number]), then search
for a target by random reduction: pick two remaining values and an operator, replace them by the result, until one
value is left. Subtraction is ordered to stay non-negative and division must be exact, so every intermediate is a
non-negative integer and the final expression uses every number exactly once, which is what TinyZero's reward
checks. A result in [1, max_target] is accepted; otherwise the search is retried (then new numbers drawn).
TinyZero's own data (Jiayi-Pan/Countdown-Tasks-3to4) does not document its generator; this target distribution
is ours (it favours targets reachable in many ways).

Rows: ``nums``, ``target``, ``problem`` (TinyZero's wording), ``solution`` (one valid expression) and
``messages`` (the problem and a worked answer: one ``<think>`` line per step, then ``<answer> expr </answer>``).

``wording="short"`` keeps only the first sentence of TinyZero's request ("Using the numbers [8, 3, 9], create an
equation that equals 14."), a quarter of its length: the tiny model on CPU learns to read the numbers from it
within a short warm-up, while with the full wording (117 tiny-tokenizer tokens) its traces did not even copy them.

``format_only=True`` replaces the worked answer in ``messages`` by *another* random reduction of the same numbers
(its own seeded stream; the task, its target and ``solution`` do not change): the trace is well formed and its
arithmetic is right, but it reaches the target only by chance. An SFT warm-up on such rows teaches the output
format and the step-by-step arithmetic, not the search for the target, which is left to the reward (the R1-Zero
setting in miniature: ``conf/experiment/r1_zero/tiny_countdown_*.yaml``).
"""

from __future__ import annotations

import random
from typing import Any

from stagewise.data.generators.common import check_split, rng_for, task_split
from stagewise.data.sources.countdown import countdown_prompt

OPS = "+-*/"


def reduce_once(nums: list[int], rng: random.Random) -> tuple[int, str, list[str]] | None:
    """One random reduction of ``nums`` to a single value: (value, expression, step lines), or None if a
    drawn division was not exact."""
    items = [(v, str(v)) for v in nums]
    steps: list[str] = []
    while len(items) > 1:
        i, j = rng.sample(range(len(items)), 2)
        (a, ea), (b, eb) = items[i], items[j]
        op = rng.choice(OPS)
        if op in "-/" and a < b:
            (a, ea), (b, eb) = (b, eb), (a, ea)
        if op == "/" and (b == 0 or a % b):
            return None
        v = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else 0}[op]
        steps.append(f"{a} {op} {b} = {v}")
        items = [x for k, x in enumerate(items) if k not in (i, j)] + [(v, f"({ea} {op} {eb})")]
    value, expr = items[0]
    return value, expr[1:-1] if expr.startswith("(") else expr, steps


WORDINGS = ("tinyzero", "short")


def countdown_row(nums: list[int], target: int, expr: str, steps: list[str], wording: str = "tinyzero"
                  ) -> dict[str, Any]:
    problem = countdown_prompt(nums, target)
    if wording == "short":
        problem = problem.split(". ", 1)[0] + "."
    answer = "<think>\n" + "\n".join(steps) + f"\n</think>\n<answer> {expr} </answer>"
    return {
        "nums": list(nums),
        "target": target,
        "problem": problem,
        "solution": expr,
        "messages": [{"role": "user", "content": problem}, {"role": "assistant", "content": answer}],
    }


def random_trace(nums: list[int], rng: random.Random) -> tuple[str, list[str]]:
    """A random reduction of ``nums`` (any result): its expression and step lines."""
    while (found := reduce_once(nums, rng)) is None:
        pass
    return found[1], found[2]


def countdown(n: int, split: str = "train", seed: int = 0, num_numbers: tuple[int, ...] | list[int] = (3, 4),
              max_number: int = 99, max_target: int = 100, format_only: bool = False,
              wording: str = "tinyzero") -> list[dict[str, Any]]:
    check_split(split, "countdown")
    if isinstance(num_numbers, int):
        num_numbers = [num_numbers]
    if n < 0 or max_number < 1 or max_target < 1 or not num_numbers or min(num_numbers) < 2:
        raise ValueError("generator:countdown: need n >= 0, max_number >= 1, max_target >= 1 and every "
                         f"num_numbers >= 2 (got n={n}, max_number={max_number}, max_target={max_target}, "
                         f"num_numbers={list(num_numbers)})")
    if wording not in WORDINGS:
        raise ValueError(f"generator:countdown: wording must be one of {WORDINGS}, got {wording!r}")
    rng = rng_for("countdown", split, seed)
    format_rng = rng_for("countdown/format_only", split, seed)
    rows: list[dict[str, Any]] = []
    seen: set[tuple[tuple[int, ...], int]] = set()
    draws = 0
    while len(rows) < n:
        draws += 1
        if draws > 200 * n + 1000:
            raise ValueError(f"generator:countdown: found only {len(rows)} of {n} distinct {split} tasks; "
                             "raise max_number or max_target")
        nums = [rng.randint(1, max_number) for _ in range(rng.choice(list(num_numbers)))]
        for _ in range(100):
            found = reduce_once(nums, rng)
            if found is not None and 1 <= found[0] <= max_target:
                break
        else:
            continue
        target, expr, steps = found
        key = (tuple(sorted(nums)), target)
        if key in seen or task_split(f"{list(key[0])}={target}") != split:
            continue
        seen.add(key)
        row = countdown_row(nums, target, expr, steps, wording)
        if format_only:
            shown = countdown_row(nums, target, *random_trace(nums, format_rng), wording)
            row["messages"] = shown["messages"]
        rows.append(row)
    return rows
