"""format, format_strict, tag_count, reasoning_steps, repetition_penalty (reference §2.2-§2.4, §2.7, §3)."""

import pytest

from stagewise.rewards import build

STRICT_OK = "<think>\na\n</think>\n<answer>\nb\n</answer>"

FORMAT = [
    ("<think>a</think><answer>b</answer>", 1.0),  # no whitespace needed between blocks
    (STRICT_OK, 1.0),
    ("<think>a</think>   \n\n  <answer>b</answer>", 1.0),  # any whitespace between blocks, blank lines too
    ("  <think>a</think><answer>b</answer>\n", 1.0),  # leading/trailing whitespace (departure: tutorial fails lead)
    ("<think>a</think><answer>b</answer>\nextra", 0.0),  # departure: the tutorial's MULTILINE $ accepted this
    ("<think>a</think><answer>b</answer> extra", 0.0),
    ("<answer>b</answer>", 0.0),  # no think block
    ("<think>a</think>", 0.0),  # no answer block
    ("", 0.0),
    ("x<think>a</think><answer>b</answer>", 0.0),  # text before
    ("<think>a</think>text<answer>b</answer>", 0.0),  # text between
    ("<think>a</think><think>b</think><answer>c</answer>", 1.0),  # lazy .*? spans a second think (as tutorial)
    ("<think></think><answer></answer>", 1.0),  # empty blocks
    ("<answer>b</answer><think>a</think>", 0.0),  # wrong order
    ("<think>a</think><answer>b", 0.0),  # unclosed answer
]


@pytest.mark.parametrize("completion,expected", FORMAT)
def test_format_table(completion, expected):
    assert build("format")([completion], prompt=["ignored"]) == [expected]


FORMAT_STRICT = [
    (STRICT_OK, 1.0),
    ("<think>a</think><answer>b</answer>", 0.0),  # newlines required
    (STRICT_OK + "\nextra", 1.0),  # open-r1 quirk kept: MULTILINE $ before a newline
    (STRICT_OK + " extra", 0.0),
    ("<think>\na\n</think>\n\n<answer>\nb\n</answer>", 0.0),  # blank line between blocks
    (" " + STRICT_OK, 0.0),  # leading whitespace
    ("<think>\n</think>\n<answer>\nb\n</answer>", 0.0),  # the two newlines inside think must be distinct
    ("<think>\n\n</think>\n<answer>\nb\n</answer>", 1.0),
    ("<think>\na\n</think>\n<think>\nb\n</think>\n<answer>\nc\n</answer>", 1.0),  # second think passes
    ("", 0.0),
]


@pytest.mark.parametrize("completion,expected", FORMAT_STRICT)
def test_format_strict_table(completion, expected):
    assert build("format_strict")([completion]) == [expected]


TAG_COUNT = [
    (STRICT_OK, 1.0),
    ("", 0.0),
    ("<think>a</think><answer>b</answer>", 0.0),  # tags without their newlines count as missing
    ("<think>\na\n</think>\n<answer>\nb</answer>", 0.75),  # "\n</answer>" missing
    ("<think>\na\n</think>\n<think>\nb\n</think>\n<answer>\nc\n</answer>", 0.5),  # duplicated think: both lose
    ("<think>\n", 0.25),
    ("x\n<answer>\n5\n</answer>", 0.5),
]


@pytest.mark.parametrize("completion,expected", TAG_COUNT)
def test_tag_count_table(completion, expected):
    assert build("tag_count")([completion]) == [expected]


REASONING_STEPS = [
    ("Step 1: a\nStep 2: b\nStep 3: c", 1.0),
    ("1. a\n2. b\n3. c", 1.0),  # every numbered line counts (MULTILINE; open-r1 would give 1/3)
    ("Intro\n1. a\n2. b", 2 / 3),
    ("First, a. Second, b.", 2 / 3),
    ("first, lowercase does not count", 0.0),
    ("", 0.0),
    ("\n- a\n- b\n* c\nFinally, d", 1.0),  # 4 markers, capped at 1
    ("x\n-3 is negative", 1 / 3),  # quirk: a line starting with a negative number
    ("3.5 is the answer", 1 / 3),  # quirk: a line starting with a decimal
    ("Step 1:Step 2:", 2 / 3),
]


@pytest.mark.parametrize("completion,expected", REASONING_STEPS)
def test_reasoning_steps_table(completion, expected):
    assert build("reasoning_steps")([completion]) == [pytest.approx(expected)]


def test_reasoning_steps_num_steps():
    assert build("reasoning_steps", num_steps=2)(["Step 1: a"]) == [0.5]
    assert build("reasoning_steps", num_steps=1)(["Step 1: a"]) == [1.0]
    with pytest.raises(ValueError, match="num_steps"):
        build("reasoning_steps", num_steps=0)


REPETITION = [
    ("", 0.0),
    ("a b", 0.0),  # fewer words than n
    ("a b c", 0.0),  # one trigram
    ("a b c a b c", -0.025),  # 4 trigrams, 3 unique: (1 - 3/4) * -0.1
    ("A b c a B c", -0.025),  # lower-cased
    ("x x x x x", -0.1 * (1 - 1 / 3)),  # 3 trigrams, 1 unique
    ("a b c, a b c", 0.0),  # punctuation stays attached: "c," != "c", all 4 trigrams unique
]


@pytest.mark.parametrize("completion,expected", REPETITION)
def test_repetition_penalty_table(completion, expected):
    assert build("repetition_penalty")([completion]) == [pytest.approx(expected)]


def test_repetition_penalty_params_and_errors():
    # bigrams of "a a a a": 3 bigrams, 1 unique -> (1 - 1/3) * -1
    assert build("repetition_penalty", ngram_size=2, max_penalty=-1.0)(["a a a a"]) == [pytest.approx(-2 / 3)]
    with pytest.raises(ValueError, match="max_penalty 0.5 should not be positive"):
        build("repetition_penalty", max_penalty=0.5)
    with pytest.raises(ValueError, match="'zh' is not supported"):
        build("repetition_penalty", language="zh")


def test_no_repeats_is_positive_zero():
    (value,) = build("repetition_penalty")(["one two three four"])
    assert value == 0.0 and str(value) == "0.0"
