"""countdown (TinyZero, reference §5): ast-parsed, whitelisted arithmetic, exact fractions."""

from fractions import Fraction

import pytest

from stagewise.rewards import build
from stagewise.rewards.countdown import evaluate, parse_equation

COUNTDOWN = [
    # (nums, target, completion, expected)
    ([1, 2, 3], 9, "<answer>(1+2)*3</answer>", 1.0),
    ([1, 2, 3], 9, "<answer> (1 + 2) * 3 </answer>", 1.0),
    ([1, 2, 3], 9, "<think>try</think>\n<answer>\n(1+2)*3\n</answer>\n", 1.0),  # TinyZero: 0 (last-line rule)
    ([1, 2, 3], 9, "<answer>(1+2)*3</answer><|endoftext|>", 1.0),
    ([1, 2, 3], 9, "no tags", 0.0),
    ([1, 2, 3], 9, "<answer>(1+2)*3", 0.0),  # unclosed
    ([1, 2, 3], 9, "<answer></answer>", 0.0),  # empty: not well-formed (TinyZero 0.1)
    ([1, 2, 3], 9, "<answer>1+2+3</answer>", 0.1),  # well-formed, value 6
    ([1, 2, 3], 6, "<answer>1+2+3+3</answer>", 0.1),  # 3 reused
    ([1, 2, 3], 3, "<answer>1+2</answer>", 0.1),  # 3 unused
    ([1, 2, 3], 10, "<answer>1+2+3+4</answer>", 0.1),  # extra literal
    ([3, 3, 6], 1, "<answer>6/(3-3)</answer>", 0.1),  # division by zero
    ([2, 3], 9, "<answer>3**2</answer>", 0.0),  # ** not allowed (TinyZero: 1.0)
    ([2, 7], 3, "<answer>7//2</answer>", 0.0),  # // not allowed
    ([1, 2, 3], 9, "<answer>(1+2)*3 = 9</answer>", 0.0),  # "=" not allowed
    ([1, 5, 2], 3, "<answer>1.5*2</answer>", 0.0),  # decimals are not the numbers 1 and 5 (TinyZero: 1.0)
    ([1, 2, 3], 9, "<answer>__import__('os').system('x')</answer>", 0.0),  # never evaluated
    ([12, 1], 13, "<answer>1_2+1</answer>", 0.0),  # underscores in literals rejected
    ([1, 2, 3], 9, "<answer>((1+2)*3</answer>", 0.0),  # syntax error
    ([1, 2, 3], 9, "<answer>(1+2)3</answer>", 0.0),  # implicit multiplication
    ([4, 2], 2, "<answer>4/2</answer>", 1.0),
    ([3, 1, 3], 1, "<answer>(1/3)*3</answer>", 1.0),  # exact fractions
    ([10, 5], -5, "<answer>5-10</answer>", 1.0),  # negative target
    ([5, 10], 5, "<answer>-5+10</answer>", 1.0),  # unary minus
    ([1, 2, 3], 9, "<answer>1+2</answer> then <answer>(1+2)*3</answer>", 1.0),  # last answer counts
    ([1, 2, 3], 9, "<answer>(1+2)*3</answer> then <answer>1+2</answer>", 0.1),
    ([1, 2, 3], 9, "<answer>" + "(" * 300 + "1" + ")" * 300 + "</answer>", 0.0),  # parser nesting limit
    ([100, 1], 100, "<answer>100*1</answer>", 1.0),
]


@pytest.mark.parametrize("nums,target,completion,expected", COUNTDOWN)
def test_countdown_table(nums, target, completion, expected):
    assert build("countdown")([completion], nums=[nums], target=[target], prompt=["ignored"]) == [expected]


def test_countdown_column_types_and_scores():
    fn = build("countdown", format_score=0.2, score=2.0)
    out = fn(["<answer>(1+2)*3</answer>", "<answer>1+2+3</answer>"], nums=[(3, 2, 1), [1.0, 2.0, 3.0]],
             target=["9", 9.0])
    assert out == [2.0, 0.2]


def test_countdown_missing_columns_is_none():
    assert build("countdown")(["<answer>1+2</answer>"], nums=[[1, 2]]) == [None]


def test_parse_and_evaluate():
    assert evaluate(parse_equation("7 - 3 * 2")) == 1
    assert evaluate(parse_equation("(7 - 3) / 6")) == Fraction(2, 3)
    assert evaluate(parse_equation("-(2 + 3)")) == -5
    for bad in ["2 ** 3", "x + 1", "abs(-1)", "1 if 1 else 2", "[1]", "1; 2", "1 % 2", "", "1.0"]:
        assert parse_equation(bad) is None, bad
    with pytest.raises(ZeroDivisionError):
        evaluate(parse_equation("1 / (2 - 2)"))
