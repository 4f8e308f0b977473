"""Sums of three numbers with a two-line worked trace: the default run's task.

A row (``a=12, b=7, c=30``)::

    problem  "What is 12 + 7 + 30?"
    answer   "49"
    messages [user: problem,
              assistant: "<think>\\n12 + 7 = 19\\n19 + 30 = 49\\n</think>\\n<answer>\\n49\\n</answer>"]

The assistant text is the R1 format that the ``format`` and ``accuracy`` rewards read. Triples are unique within a
split, and a triple's split is a hash of ``"a+b+c"`` (see `task_split`).
"""

from __future__ import annotations

from typing import Any

from stagewise.data.generators.common import check_split, rng_for, task_split


def arithmetic_row(a: int, b: int, c: int) -> dict[str, Any]:
    s1, s2 = a + b, a + b + c
    problem = f"What is {a} + {b} + {c}?"
    trace = f"<think>\n{a} + {b} = {s1}\n{s1} + {c} = {s2}\n</think>\n<answer>\n{s2}\n</answer>"
    return {
        "problem": problem,
        "answer": str(s2),
        "messages": [{"role": "user", "content": problem}, {"role": "assistant", "content": trace}],
    }


def arithmetic(n: int, split: str = "train", seed: int = 0, max_value: int = 99) -> list[dict[str, Any]]:
    check_split(split, "arithmetic")
    if n < 0 or max_value < 0:
        raise ValueError(f"generator:arithmetic: n and max_value must be >= 0 (got n={n}, max_value={max_value})")
    rng = rng_for("arithmetic", split, seed)
    seen: set[tuple[int, int, int]] = set()
    rows: list[dict[str, Any]] = []
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"generator:arithmetic: cannot draw {n} distinct {split} triples with max_value="
                             f"{max_value} (only {len(rows)} found); raise max_value or lower n")
        t = (rng.randint(0, max_value), rng.randint(0, max_value), rng.randint(0, max_value))
        if t in seen or task_split("+".join(map(str, t))) != split:
            continue
        seen.add(t)
        rows.append(arithmetic_row(*t))
    return rows
