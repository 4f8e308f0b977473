"""length (Kimi k1.5), cosine (tutorial), soft_overlong (DAPO): reference §2.5, §2.6, §2.8, §3."""

import math

import pytest

from stagewise.rewards import build

A = "\\boxed{4}"  # 9 chars, correct for gold "4"
B = "x" * 11 + " \\boxed{4}"  # 21 chars, correct
C = "\\boxed{5}" + "y" * 24  # 33 chars, wrong
D = "\\boxed{5}"  # 9 chars, wrong


def test_lengths_used_below():
    assert [len(s) for s in (A, B, C, D)] == [9, 21, 33, 9]


LENGTH = [
    # (completions, golds, prompts or None, expected)
    # one group: min 9, max 33 -> lam = 0.5 - (L - 9) / 24
    ([A, B, C, D], ["4"] * 4, None, [0.5, 0.0, -0.5, 0.0]),
    # equal lengths -> 0 for everyone
    ([A, D], ["4", "4"], None, [0.0, 0.0]),
    # an empty wrong completion sets the minimum (L10): lam(A) = 0.5 - 9/21 = 1/14, lam(B) = -0.5 (correct)
    (["", A, B], ["4"] * 3, None, [0.0, 1 / 14, -0.5]),
    # grouped by prompt: p1 = {A, B}: 0.5, -0.5; p2 = {C, D}: wrong -> min(0, -0.5), min(0, 0.5)
    ([A, B, C, D], ["4"] * 4, ["p1", "p1", "p2", "p2"], [0.5, -0.5, -0.5, 0.0]),
    # conversational prompts group the same way
    ([A, B], ["4", "4"], [[{"role": "user", "content": "q"}]] * 2, [0.5, -0.5]),
    # unparseable gold -> None, but the length still counts in the group's min/max
    ([A, C], ["4", "not a number"], None, [0.5, None]),
]


@pytest.mark.parametrize("completions,golds,prompts,expected", LENGTH)
def test_length_table(completions, golds, prompts, expected):
    columns = {"solution": golds} if prompts is None else {"solution": golds, "prompt": prompts}
    out = build("length")(completions, **columns)
    assert out == [None if e is None else pytest.approx(e) for e in expected]


def pad(text: str, length: int) -> str:
    return "x" * (length - len(text)) + text


COSINE = [
    # tutorial defaults: correct 0.8..1.0, wrong -0.5 (short) .. -0.1 (long), max_len 1000 chars
    (A, "4", 0.8 + 0.1 * (1 + math.cos(math.pi * 9 / 1000))),
    (pad(A, 500), "4", 0.9),  # cos(pi/2) = 0: midpoint
    (pad(D, 500), "4", -0.3),  # -0.1 + 0.5 * (-0.4) * 1
    (pad(A, 1000), "4", 0.8),
    (pad(D, 1000), "4", -0.1),
    (pad(A, 2000), "4", 0.8),  # clamped (open-r1 would give 1.0 again)
    (pad(D, 2000), "4", -0.1),  # clamped (open-r1: -0.5)
    ("", "4", -0.5),  # empty = wrong with L=0
    (A, "not a number", None),  # unparseable gold
]


@pytest.mark.parametrize("completion,gold,expected", COSINE)
def test_cosine_table(completion, gold, expected):
    out = build("cosine")([completion], solution=[gold])
    assert out == [None if expected is None else pytest.approx(expected)]


def test_cosine_open_r1_function_defaults():
    fn = build("cosine", min_value_wrong=-1.0, max_value_wrong=-0.5, min_value_correct=0.5, max_value_correct=1.0,
               max_len=1000)
    assert fn(["", pad(D, 1000), pad(A, 1000)], solution=["4"] * 3) == [-1.0, -0.5, 0.5]
    with pytest.raises(ValueError, match="max_len"):
        build("cosine", max_len=0)


SOFT_OVERLONG = [  # max 20, cache 5: punishment starts after 15 tokens
    (0, 0.0), (15, 0.0), (16, -0.2), (18, -0.6), (20, -1.0), (21, -1.0), (100, -1.0),
]


@pytest.mark.parametrize("length,expected", SOFT_OVERLONG)
def test_soft_overlong_table(length, expected):
    fn = build("soft_overlong", max_completion_len=20, soft_punish_cache=5)
    assert fn(["text"], completion_lengths=[length]) == [pytest.approx(expected)]
    assert fn(["text"], completion_ids=[list(range(length))]) == [pytest.approx(expected)]


def test_soft_overlong_defaults_and_columns():
    fn = build("soft_overlong")  # open-r1 defaults 16384 / 4096
    assert fn(["a"] * 4, completion_lengths=[12288, 12289, 16384, 16385]) == [0.0, -1 / 4096, -1.0, -1.0]
    # completion_lengths wins over completion_ids; characters never count
    assert fn(["a" * 20000], completion_lengths=[3], completion_ids=[[0] * 20000]) == [0.0]
    assert fn(["a"], prompt=["p"]) == [None]  # no token counts: not scorable (error logged)
    with pytest.raises(ValueError, match="soft_punish_cache"):
        build("soft_overlong", max_completion_len=10, soft_punish_cache=20)
