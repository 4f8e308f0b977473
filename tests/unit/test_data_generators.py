"""Offline generators: exact formats, determinism, disjoint splits, solvable countdown targets."""

from __future__ import annotations

import re

import pytest

from stagewise.data import GENERATORS
from stagewise.data.generators import HELD_OUT_PER_MILLE, task_split
from stagewise.data.generators.arithmetic import arithmetic, arithmetic_row
from stagewise.data.generators.countdown import countdown, reduce_once


def test_arithmetic_row_format():
    row = arithmetic_row(12, 7, 30)
    assert row == {
        "problem": "What is 12 + 7 + 30?",
        "answer": "49",
        "messages": [
            {"role": "user", "content": "What is 12 + 7 + 30?"},
            {"role": "assistant", "content": "<think>\n12 + 7 = 19\n19 + 30 = 49\n</think>\n<answer>\n49\n</answer>"},
        ],
    }


def test_arithmetic_is_deterministic_and_seeded():
    assert arithmetic(20, seed=1) == arithmetic(20, seed=1)
    assert arithmetic(20, seed=1) != arithmetic(20, seed=2)
    assert arithmetic(5, seed=1) == arithmetic(20, seed=1)[:5]  # a prefix: n only decides where to stop
    for row in arithmetic(50, max_value=9):
        a, b, c = map(int, re.findall(r"\d+", row["problem"]))
        assert max(a, b, c) <= 9 and row["answer"] == str(a + b + c)


def test_arithmetic_train_and_test_never_overlap():
    train = {r["problem"] for r in arithmetic(900, split="train", max_value=12)}
    test = {r["problem"] for r in arithmetic(150, split="test", max_value=12, seed=7)}
    assert len(train) == 900 and len(test) == 150 and not train & test
    assert all(task_split("+".join(re.findall(r"\d+", p))) == "test" for p in test)


def test_held_out_share_is_close_to_its_setting():
    keys = [f"{a}+{b}+{c}" for a in range(20) for b in range(20) for c in range(20)]
    share = sum(task_split(k) == "test" for k in keys) / len(keys)
    assert abs(share - HELD_OUT_PER_MILLE / 1000) < 0.02


def test_arithmetic_too_small_space_is_an_error():
    with pytest.raises(ValueError, match="cannot draw 100 distinct train 3-term sums with max_value=2"):
        arithmetic(100, max_value=2)
    with pytest.raises(ValueError, match="split must be one of"):
        arithmetic(3, split="validation")


def _numbers_used(expr: str) -> list[int]:
    return sorted(int(x) for x in re.findall(r"\d+", expr))


def test_countdown_rows_are_solvable_with_every_number_once():
    rows = countdown(300, seed=3)
    assert countdown(300, seed=3) == rows
    assert {len(r["nums"]) for r in rows} == {3, 4}
    for r in rows:
        assert 1 <= r["target"] <= 100 and all(1 <= n <= 99 for n in r["nums"])
        assert _numbers_used(r["solution"]) == sorted(r["nums"])
        assert re.fullmatch(r"[\d+\-*/() ]+", r["solution"])
        assert eval(r["solution"], {"__builtins__": {}}) == r["target"]
        answer = r["messages"][1]["content"]
        assert answer.splitlines()[-1] == f"<answer> {r['solution']} </answer>"  # TinyZero reads the last line
        assert len(re.findall(r" = ", answer)) == len(r["nums"]) - 1  # one trace line per reduction step
        assert r["problem"].startswith(f"Using the numbers {r['nums']}, create an equation that equals {r['target']}.")


def test_countdown_splits_are_disjoint():
    key = lambda r: (tuple(sorted(r["nums"])), r["target"])  # noqa: E731
    train = {key(r) for r in countdown(400, num_numbers=[3], max_number=20, max_target=30)}
    test = {key(r) for r in countdown(60, split="test", num_numbers=[3], max_number=20, max_target=30)}
    assert len(train) == 400 and len(test) == 60 and not train & test


class _Scripted:
    """A stand-in RNG replaying fixed choices, to check one reduction by hand."""

    def __init__(self, pairs, ops):
        self.pairs, self.ops = list(pairs), list(ops)

    def sample(self, population, k):
        return self.pairs.pop(0)

    def choice(self, seq):
        return self.ops.pop(0)


def test_reduce_once_by_hand():
    # [2, 3, 4]: (3 * 4) = 12 -> [2, 12]; then 2 and 12 with "-": ordered to 12 - 2 = 10
    value, expr, steps = reduce_once([2, 3, 4], _Scripted([(1, 2), (0, 1)], ["*", "-"]))
    assert (value, expr, steps) == (10, "(3 * 4) - 2", ["3 * 4 = 12", "12 - 2 = 10"])
    # an inexact division is rejected: 3 / 2
    assert reduce_once([3, 2], _Scripted([(0, 1)], ["/"])) is None
    value, expr, _ = reduce_once([2, 8], _Scripted([(0, 1)], ["/"]))  # ordered to 8 / 2
    assert (value, expr) == (4, "8 / 2")


def test_registry():
    assert set(GENERATORS) == {"arithmetic", "countdown", "analysis_tasks"}


def test_arithmetic_four_terms_and_unworked_rows_by_hand():
    assert arithmetic_row(3, 9, 0, 7)["messages"][1]["content"] == (
        "<think>\n3 + 9 = 12\n12 + 0 = 12\n12 + 7 = 19\n</think>\n<answer>\n19\n</answer>")
    row = arithmetic_row(3, 9, 0, 7, worked=False)
    assert row["problem"] == "What is 3 + 9 + 0 + 7?" and row["answer"] == "19"
    assert row["messages"][1]["content"] == "<think>\n</think>\n<answer>\n19\n</answer>"


def test_unworked_fraction_changes_only_the_traces():
    worked = arithmetic(1000, max_value=9, terms=4)
    mixed = arithmetic(1000, max_value=9, terms=4, unworked_fraction=0.5)
    assert [r["problem"] for r in worked] == [r["problem"] for r in mixed]  # same sums, same order
    unworked = [r["messages"][1]["content"].startswith("<think>\n</think>") for r in mixed]
    assert not any(r["messages"][1]["content"].startswith("<think>\n</think>") for r in worked)
    assert 450 <= sum(unworked) <= 550  # its own seeded stream: a Bernoulli(0.5) per row
    assert mixed == arithmetic(1000, max_value=9, terms=4, unworked_fraction=0.5)
    assert all(r["messages"][1]["content"].startswith("<think>\n</think>")
               for r in arithmetic(20, max_value=9, terms=4, unworked_fraction=1.0))
    for row in mixed[:50]:
        numbers = list(map(int, re.findall(r"\d+", row["problem"])))
        assert len(numbers) == 4 and max(numbers) <= 9 and row["answer"] == str(sum(numbers))


def test_drop_last_shortcut_makes_only_the_unworked_answers_wrong():
    row = arithmetic_row(3, 9, 0, 7, worked=False, shortcut="drop_last")
    assert row["answer"] == "19"  # the reward's gold stays the true sum
    assert row["messages"][1]["content"] == "<think>\n</think>\n<answer>\n12\n</answer>"  # 3 + 9 + 0, last term dropped
    assert arithmetic_row(3, 9, 0, 7, shortcut="drop_last") == arithmetic_row(3, 9, 0, 7)  # worked rows stay right
    rows = arithmetic(500, max_value=9, terms=4, unworked_fraction=0.7, shortcut="drop_last")
    plain = arithmetic(500, max_value=9, terms=4, unworked_fraction=0.7)
    assert [r["problem"] for r in rows] == [r["problem"] for r in plain]
    for row, ref in zip(rows, plain):
        numbers = list(map(int, re.findall(r"\d+", row["problem"])))
        stated = int(re.search(r"<answer>\n(\d+)\n", row["messages"][1]["content"]).group(1))
        unworked = ref["messages"][1]["content"].startswith("<think>\n</think>")
        assert stated == (sum(numbers[:-1]) if unworked else sum(numbers))
        assert row["answer"] == str(sum(numbers))
    with pytest.raises(ValueError, match="shortcut must be one of"):
        arithmetic(3, shortcut="random")


def test_arithmetic_bad_terms_or_fraction_is_an_error():
    with pytest.raises(ValueError, match="terms must be >= 2"):
        arithmetic(3, terms=1)
    with pytest.raises(ValueError, match=r"unworked_fraction must be in \[0, 1\]"):
        arithmetic(3, unworked_fraction=1.5)


def test_countdown_format_only_rows_keep_the_task_and_show_a_random_valid_trace():
    from stagewise.rewards import build

    plain = countdown(300, num_numbers=[3], max_number=12, max_target=30)
    rows = countdown(300, num_numbers=[3], max_number=12, max_target=30, format_only=True, wording="short")
    score = build("countdown")
    for a, b in zip(plain, rows):  # same tasks, same gold solution
        assert (a["nums"], a["target"], a["solution"]) == (b["nums"], b["target"], b["solution"])
        assert b["problem"] == f"Using the numbers {b['nums']}, create an equation that equals {b['target']}."
        assert b["messages"][0]["content"] == b["problem"]
    texts = [r["messages"][1]["content"] for r in rows]
    cols = {"nums": [r["nums"] for r in rows], "target": [r["target"] for r in rows]}
    # every shown trace is well formed and uses each number once (format score 0.1 at least) ...
    shown = score(texts, **cols)
    assert all(s in (0.1, 1.0) for s in shown)
    # ... but hits the target only by chance, while the gold solutions always do
    assert 0.03 < sum(s == 1.0 for s in shown) / len(rows) < 0.25
    gold = score([f"<answer> {r['solution']} </answer>" for r in rows], **cols)
    assert gold == [1.0] * len(rows)
    with pytest.raises(ValueError, match="wording must be one of"):
        countdown(3, wording="long")
