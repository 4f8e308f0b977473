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
quality, as distilled cold-start data is.

``shortcut="drop_last"`` makes those straight answers systematically wrong: they give the sum *without its last
term* (``"What is 12 + 7 + 30?"`` answered ``19``), while the worked rows stay right. The row's ``answer`` column
always holds the true sum. This is the default run's task (``conf/experiment/tiny/``): a model that imitates the
warm-up data answers straight away on most prompts (the majority form) and is then nearly always wrong, but it
also learned the worked form, which sampling finds on a good share of prompts and which is right. The gap between
the two is built into the data, so it does not depend on where SFT happens to land; closing it takes the reward
(R1-Zero's "reasoning emerges from reward", in miniature). A consistent shortcut, not random wrong answers:
greedy decoding would recover the mode of random noise and answer right anyway.
"""

from __future__ import annotations

from typing import Any

from stagewise.data.generators.common import check_split, rng_for, task_split


SHORTCUTS = ("none", "drop_last")


def arithmetic_row(*numbers: int, worked: bool = True, shortcut: str = "none") -> dict[str, Any]:
    """One row for ``numbers[0] + numbers[1] + ...``; the worked trace adds them left to right, one line a step.
    An unworked row answers ``sum(numbers)``, or ``sum(numbers[:-1])`` with ``shortcut="drop_last"``."""
    if shortcut not in SHORTCUTS:
        raise ValueError(f"generator:arithmetic: shortcut must be one of {SHORTCUTS}, got {shortcut!r}")
    lines, total = [], numbers[0]
    for x in numbers[1:]:
        lines.append(f"{total} + {x} = {total + x}\n")
        total += x
    problem = "What is " + " + ".join(map(str, numbers)) + "?"
    work = "".join(lines) if worked else ""
    stated = total if worked or shortcut == "none" else total - numbers[-1]
    trace = f"<think>\n{work}</think>\n<answer>\n{stated}\n</answer>"
    return {
        "problem": problem,
        "answer": str(total),
        "messages": [{"role": "user", "content": problem}, {"role": "assistant", "content": trace}],
    }


def arithmetic(n: int, split: str = "train", seed: int = 0, max_value: int = 99, terms: int = 3,
               unworked_fraction: float = 0.0, shortcut: str = "none") -> list[dict[str, Any]]:
    check_split(split, "arithmetic")
    if n < 0 or max_value < 0:
        raise ValueError(f"generator:arithmetic: n and max_value must be >= 0 (got n={n}, max_value={max_value})")
    if terms < 2:
        raise ValueError(f"generator:arithmetic: terms must be >= 2, got {terms}")
    if not 0.0 <= unworked_fraction <= 1.0:
        raise ValueError(f"generator:arithmetic: unworked_fraction must be in [0, 1], got {unworked_fraction}")
    if shortcut not in SHORTCUTS:
        raise ValueError(f"generator:arithmetic: shortcut must be one of {SHORTCUTS}, got {shortcut!r}")
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
        rows.append(arithmetic_row(*t, worked=worked_rng.random() >= unworked_fraction, shortcut=shortcut))
    return rows
