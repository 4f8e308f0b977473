"""Countdown (Jiayi-Pan/Countdown-Tasks-3to4, TinyZero): ``nums`` (3-4 ints) and ``target`` (int).

The user message is TinyZero's request, word for word (github.com/Jiayi-Pan/TinyZero,
``examples/data_preprocess/countdown.py``). TinyZero puts it inside a hand-written "User: ... Assistant:" frame;
here the model's chat template and the configured system prompt supply that frame instead. ``problem`` gets the
same text so that every prompt loader sees one wording, and ``nums``/``target`` pass through for the countdown reward.
Rows that already carry ``messages`` (e.g. the generator's worked solutions) keep them, and rows with a ``problem`` keep
their wording (the generator's ``wording="short"``).
"""

from __future__ import annotations

from typing import Any

from stagewise.data.schema import RowError, check_messages, need


def countdown_prompt(nums: list[int], target: int) -> str:
    return (
        f"Using the numbers {list(nums)}, create an equation that equals {target}. You can use basic arithmetic "
        "operations (+, -, *, /) and each number can only be used once. Show your work in <think> </think> tags. "
        "And return the final answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>."
    )


def countdown_adapter(row: dict[str, Any]) -> dict[str, Any]:
    nums = need(row, "nums", (list, tuple))
    if not nums or not all(isinstance(n, int) and not isinstance(n, bool) for n in nums):
        raise RowError("nums", f"expected a non-empty list of ints, got {nums!r}")
    target = need(row, "target", int)
    problem = row.get("problem") or countdown_prompt(nums, target)  # a generator's own wording is kept
    if row.get("messages") is not None:
        return {"messages": check_messages(row["messages"]), "problem": problem}
    return {"messages": [{"role": "user", "content": problem}], "problem": problem}
