"""accuracy, boxed_math, answer_tag: hand-derived tables (open-r1, math-verify and DeepScaleR)."""

import logging
from fractions import Fraction

import pytest

from stagewise.rewards import build
from stagewise.rewards.base import RewardTimeout
from stagewise.rewards.math import grade_answer, last_boxed, normalize_math, parse_number, time_limit

# ---------------------------------------------------------------------------------------------- accuracy
ACCURACY = [
    # (completion, gold, expected)
    ("\\boxed{4}", "4", 1.0),  # plain-text gold parses (default extraction)
    ("The answer is 4", "4", 0.0),  # no LaTeX -> nothing extracted
    ("$4$", "4", 0.0),  # LaTeX without an anchor phrase -> nothing
    ("The answer is $4$", "4", 1.0),  # anchor phrase
    ("", "4", 0.0),  # empty completion
    ("\\boxed{4}", "no answer here", None),  # unparseable gold
    ("\\boxed{x=2}", "2", 1.0),  # equation: right-hand side
    ("\\boxed{3} then \\boxed{4}", "4", 0.0),  # several different boxed: a set, fails (math-verify 0.9)
    ("\\boxed{4} and again \\boxed{4}", "4", 1.0),  # the same answer twice
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{1,000}", "1000", 1.0),  # thousands separator
    ("\\boxed{-3}", "-3", 1.0),  # negative
    ("\\boxed{4}", "The result is $\\boxed{4}$.", 1.0),  # worked-solution gold
    ("<think>2+2</think><answer>\\boxed{4}</answer>", "4", 1.0),  # tags irrelevant
    ("<think>\\boxed{4}</think>", "4", 1.0),  # ... even inside think
    ("\\boxed{5}", "4", 0.0),  # wrong
    ("\\boxed{2\\sqrt{3}}", "2\\sqrt{3}", 1.0),  # bare-LaTeX gold is wrapped in $...$
    ("\\boxed{2}", "2\\sqrt{3}", 0.0),  # ... otherwise it would have parsed as 2
    ("\\boxed{\\pi}", "3.14", 0.0),  # no numeric tolerance
]


@pytest.mark.parametrize("completion,gold,expected", ACCURACY)
def test_accuracy_table(completion, gold, expected):
    assert build("accuracy")([completion], solution=[gold]) == [expected]


def test_accuracy_reads_answer_before_solution_and_any_of_a_list():
    fn = build("accuracy")
    # `answer` wins over `solution` when it has a value; an empty answer falls back to the solution
    out = fn(["\\boxed{4}", "\\boxed{4}", "\\boxed{4}"], answer=["4", None, ["3", "4"]],
             solution=["$\\boxed{5}$", "$\\boxed{4}$", "$\\boxed{5}$"], prompt=["p", "q", "r"])
    assert out == [1.0, 1.0, 1.0]
    assert fn(["\\boxed{4}"], answer=["5"], solution=["4"]) == [0.0]


def test_accuracy_without_gold_column_is_none_and_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="stagewise.rewards"):
        assert build("accuracy")(["\\boxed{4}", "\\boxed{5}"], prompt=["a", "b"]) == [None, None]
    failures = [r for r in caplog.records if "needs a 'solution' or 'answer' column" in r.getMessage()]
    assert len(failures) == 1  # logged once, not once per sample


# ------------------------------------------------------------------------------------- MATH normaliser
NORMALISE = [
    ("\\frac12", "\\frac{1}{2}"),
    ("\\frac1{2}", "\\frac{1}{2}"),
    ("\\dfrac{3}{4}", "\\frac{3}{4}"),
    ("\\tfrac{3}{4}", "\\frac{3}{4}"),
    ("0.5", "\\frac{1}{2}"),
    (".5", "\\frac{1}{2}"),  # leading "." -> "0.", then 0.5 -> 1/2
    ("3/4", "\\frac{3}{4}"),
    ("03/4", "03/4"),  # not a canonical integer pair: unchanged
    ("\\sqrt3", "\\sqrt{3}"),
    ("\\left( 1, 2 \\right)", "(1,2)"),
    ("90^\\circ", "90"),
    ("90^{\\circ}", "90"),
    ("\\$5", "5"),
    ("5\\text{ cm}", "5"),
    ("50\\%", "50"),
    ("x = 3", "3"),
    ("xyz = 3", "xyz=3"),  # left side longer than 2 characters is kept
    ("\\text{Monday}", "Monday"),
    ("1\\!000", "1000"),
    ("a\n+b", "a+b"),
]


@pytest.mark.parametrize("raw,expected", NORMALISE)
def test_normalize_math(raw, expected):
    assert normalize_math(raw) == expected


LAST_BOXED = [
    ("\\boxed{4}", "4"),
    ("a \\boxed{1} b \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # last, nested braces
    ("\\fbox{7}", "7"),
    ("\\boxed 5 apples", "5"),
    ("$\\boxed 5$", "5"),
    ("\\boxed{4", None),  # unbalanced
    ("no box", None),
    ("\\boxed{}", ""),
]


@pytest.mark.parametrize("text,expected", LAST_BOXED)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


# --------------------------------------------------------------------------------------------- boxed_math
T = "<think>reasoning</think> "
BOXED_MATH = [
    (T + "so \\boxed{4}", "4", 1.0),
    ("\\boxed{4}", "4", 0.0),  # no </think>
    (T + "no box", "4", 0.0),
    (T + "\\boxed{3} then \\boxed{4}", "4", 1.0),  # last boxed wins
    ("<think>\\boxed{4}</think> final \\boxed{5}", "4", 0.0),  # boxed inside think is ignored
    ("<think>\\boxed{4}</think> final", "4", 0.0),
    ("reasoning</think>\\boxed{4}", "4", 1.0),  # only </think> is required (pre-filled <think>)
    (T + "\\fbox{4}", "4", 1.0),
    (T + "\\boxed 4", "4", 1.0),
    (T + "\\boxed{\\dfrac{1}{2}}", "\\frac12", 1.0),  # MATH normalisation
    (T + "\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    (T + "\\boxed{2/4}", "\\frac{1}{2}", 0.0),  # unreduced fraction is wrong
    (T + "\\boxed{3/4}", "\\frac{3}{4}", 1.0),
    (T + "\\boxed{\\sqrt{12}}", "2\\sqrt{3}", 1.0),  # sympy
    (T + "\\boxed{b+a}", "a+b", 1.0),  # sympy, two letters
    (T + "\\boxed{c+b+a}", "a+b+c", 0.0),  # three unknown letters: DeepScaleR refuses sympy
    (T + "\\boxed{3.14}", "\\pi", 0.0),  # no tolerance
    (T + "\\boxed{10^{\\circ}}", "10", 1.0),
    (T + "\\boxed{5\\text{ cm}}", "5", 1.0),
    (T + "\\boxed{x = 5}", "5", 1.0),
    (T + "\\boxed{(1,2)}", "(1, 2)", 1.0),
    (T + "\\boxed{(2,1)}", "(1,2)", 0.0),
    (T + "\\boxed{[1,2)}", "(1,2)", 0.0),  # bracket kind must match
    (T + "\\boxed{(1,2,3)}", "(1,2)", 0.0),  # sizes must match
    (T + "\\boxed{1,000}", "1000", 1.0),  # thousands separator
    (T + "\\boxed{4.0}", "4", 1.0),  # integral float
    (T + "\\boxed{\\frac{8}{2}}", "4", 0.0),  # integer gold needs an integer answer
    (T + "\\boxed{-7}", "-7", 1.0),
    (T + "\\boxed{monday}", "\\text{Monday}", 1.0),  # case-insensitive text
    (T + "\\boxed{}", "4", 0.0),  # empty box
    (T + "\\boxed{4", "4", 0.0),  # unbalanced
    (T + "\\boxed{4}", "", None),  # no gold
    (T + "\\boxed{2/3}", "We find $\\boxed{\\frac{2}{3}}$.", 1.0),  # boxed gold is unwrapped
    (T + "\\boxed{7}", ["5", "7"], 1.0),  # any of a list
]


@pytest.mark.parametrize("completion,gold,expected", BOXED_MATH)
def test_boxed_math_table(completion, gold, expected):
    assert build("boxed_math")([completion], answer=[gold]) == [expected]


def test_boxed_math_missing_answer_is_none():
    assert build("boxed_math")([T + "\\boxed{4}"], answer=[None], solution=[None]) == [None]


def test_grade_answer_is_not_symmetric_about_integers():
    assert grade_answer("4", "4") is True
    assert grade_answer("\\frac{8}{2}", "4") is False
    assert grade_answer("4", "\\frac{8}{2}") is False


def test_time_limit_interrupts_python_code():
    with pytest.raises(RewardTimeout):
        with time_limit(0.05, "busy loop"):
            while True:
                pass
    with time_limit(1.0, "quick"):  # no alarm left behind
        x = sum(range(100))
    assert x == 4950


# --------------------------------------------------------------------------------------------- answer_tag
ANSWER_TAG = [
    ("<answer>18</answer>", "18", 1.0),
    ("<answer>-2</answer>", "-2", 1.0),
    ("<answer>+5</answer>", "5", 1.0),
    ("<answer>\u22123</answer>", "-3", 1.0),  # unicode minus
    ("<answer>1,234</answer>", "1234", 1.0),
    ("<answer>1234</answer>", "1,234", 1.0),
    ("<answer>1,23</answer>", "123", 0.0),  # malformed thousands separator
    ("<answer>3.14</answer>", "3.14", 1.0),
    ("<answer>3.140</answer>", "3.14", 1.0),
    ("<answer>.5</answer>", "0.5", 1.0),
    ("<answer>-2/3</answer>", "-2/3", 1.0),
    ("<answer>-4/6</answer>", "-2/3", 1.0),  # exact rational equality
    ("<answer>0.5</answer>", "1/2", 1.0),
    ("<answer>\\frac{2}{3}</answer>", "2/3", 1.0),
    ("<answer>2/3</answer>", "\\frac{2}{3}", 1.0),
    ("<answer>-\\dfrac{1}{2}</answer>", "-0.5", 1.0),
    ("<answer> $18$. </answer>", "18", 1.0),  # $, spaces and a final period
    ("<answer>\\boxed{18}</answer>", "18", 1.0),
    ("<answer>17</answer>", "18", 0.0),
    ("<answer>1/0</answer>", "1", 0.0),  # zero denominator is not a number
    ("<answer>7</answer> then <answer>18</answer>", "18", 1.0),  # last tag
    ("<answer>18</answer> then <answer>7</answer>", "18", 0.0),
    ("<answer></answer>", "18", 0.0),  # empty tag
    ("<answer>eighteen</answer>", "18", 0.0),
    ("so the answer is 18", "18", 0.5),  # no tag: fallback on the last number
    ("\\boxed{18} and then 7", "18", 0.5),  # fallback prefers the last \boxed{}
    ("the answer is 17", "18", 0.0),
    ("it is -2/3", "-2/3", 0.5),  # fallback reads fractions
    ("no numbers at all", "18", 0.0),
    ("<answer>18", "18", 0.5),  # unclosed tag: fallback
    ("<answer>2\\sqrt{3}</answer>", "2\\sqrt{3}", 1.0),  # non-numeric gold: string comparison
    ("<answer>2 \\sqrt{3}</answer>", "2\\sqrt{3}", 1.0),
    ("<answer>\\sqrt{12}</answer>", "2\\sqrt{3}", 0.0),
    ("<answer>18</answer>", 18, 1.0),  # non-string gold
    ("<answer>18</answer>", "We get $\\boxed{18}$.", 1.0),  # boxed gold unwrapped
    ("<answer>18</answer>", "", None),  # no gold
]


@pytest.mark.parametrize("completion,gold,expected", ANSWER_TAG)
def test_answer_tag_table(completion, gold, expected):
    assert build("answer_tag")([completion], answer=[gold]) == [expected]


def test_answer_tag_scores_are_params():
    fn = build("answer_tag", correct_score=2.0, wrong_score=-1.0, fallback_score=0.25)
    out = fn(["<answer>18</answer>", "<answer>17</answer>", "is 18", "is 17", "nothing"], answer=["18"] * 5)
    assert out == [2.0, -1.0, 0.25, -1.0, -1.0]


NUMBERS = [
    ("18", Fraction(18)), ("-2/3", Fraction(-2, 3)), ("1,234.5", Fraction(2469, 2)), ("\\frac{3}{-4}", Fraction(-3, 4)),
    ("-\\frac{-1}{2}", Fraction(1, 2)), ("1.2.3", None), ("2x", None), ("", None), ("12,34", None),
]


@pytest.mark.parametrize("text,expected", NUMBERS)
def test_parse_number(text, expected):
    assert parse_number(text) == expected
