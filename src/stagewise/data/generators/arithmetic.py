"""Sums of ``terms`` numbers (three by default) with a worked trace, one line per addition: the default run's task.

A row (``a=12, b=7, c=30``)::

    problem  "What is 12 + 7 + 30?"
    answer   "49"
    messages [user: problem,
              assistant: "<think>\\n12 + 7 = 19\\n19 + 30 = 49\\n</think>\\n<answer>\\n49\\n</answer>"]

The assistant text is the R1 format that the ``format`` and ``accuracy`` rewards read. Sums are unique within a
split, and a sum's split is a hash of ``"a+b+c"`` (see `task_split`).

``unworked_fraction`` of the rows (drawn from their own seeded stream, so the sums do not change) answer straight
away with an empty ``<think>`` block, ``"<think>\n</think>\n<answer>\n49\n</answer>"``: warm-up data of mixed
quality, as distilled cold-start data is. A small model gets a four-number sum right less often in one step than
line by line, so a model warmed up on such data has something GRPO can learn from reward alone: to show the work
on every prompt (the default run, ``conf/pipeline/tiny.yaml``).
"""

from __future__ import annotations

from typing import Any

from stagewise.data.generators.common import check_split, rng_for, task_split


def arithmetic_row(*numbers: int, worked: bool = True) -> dict[str, Any]:
    """One row for ``numbers[0] + numbers[1] + ...``; the worked trace adds them left to right, one line a step."""
    lines, total = [], numbers[0]
    for x in numbers[1:]:
        lines.append(f"{total} + {x} = {total + x}\n")
        total += x
    problem = "What is " + " + ".join(map(str, numbers)) + "?"
    work = "".join(lines) if worked else ""
    trace = f"<think>\n{work}</think>\n<answer>\n{total}\n</answer>"
    return {
        "problem": problem,
        "answer": str(total),
        "messages": [{"role": "user", "content": problem}, {"role": "assistant", "content": trace}],
    }


def arithmetic(n: int, split: str = "train", seed: int = 0, max_value: int = 99, terms: int = 3,
               unworked_fraction: float = 0.0) -> list[dict[str, Any]]:
    check_split(split, "arithmetic")
    if n < 0 or max_value < 0:
        raise ValueError(f"generator:arithmetic: n and max_value must be >= 0 (got n={n}, max_value={max_value})")
    if terms < 2:
        raise ValueError(f"generator:arithmetic: terms must be >= 2, got {terms}")
    if not 0.0 <= unworked_fraction <= 1.0:
        raise ValueError(f"generator:arithmetic: unworked_fraction must be in [0, 1], got {unworked_fraction}")
    rng = rng_for("arithmetic", split, seed)
    worked_rng = rng_for("arithmetic/unworked", split, seed)
    seen: set[tuple[int, ...]] = set()
    rows: list[dict[str, Any]] = []
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"generator:arithmetic: cannot draw {n} distinct {split} {terms}-term sums with max_value="
                             f"{max_value} (only {len(rows)} found); raise max_value or lower n")
        t = tuple(rng.randint(0, max_value) for _ in range(terms))
        if t in seen or task_split("+".join(map(str, t))) != split:
            continue
        seen.add(t)
        rows.append(arithmetic_row(*t, worked=worked_rng.random() >= unworked_fraction))
    return rows
