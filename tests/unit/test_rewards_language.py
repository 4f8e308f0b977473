"""language_consistency: the word rule of reference §8, written out in stagewise/rewards/language.py."""

import pytest

from stagewise.rewards import build
from stagewise.rewards.language import chain_of_thought

EN = [
    ("<think>I think the answer is four</think><answer>4</answer>", 1.0),  # 6 ASCII words
    ("<think>I think 答案 is four</think>", 0.8),  # 4 of 5 words
    ("<think>2 + 2 = 4</think>", 0.0),  # no letters: nothing counted
    ("<think>We compute \\frac{1}{2} + x</think>", 1.0),  # LaTeX-only token ignored: We, compute, x
    ("<think>café au lait</think>", 2 / 3),  # é is not ASCII
    ("no tags at all, just English words", 1.0),  # whole text is the CoT
    ("reasoning here</think>答案", 1.0),  # pre-filled <think>: CoT is the text before </think>
    ("<think>truncated 思考", 0.5),  # no closing tag: to the end
    ("<think>число one</think>", 0.5),  # Cyrillic is not target
    ("", 0.0),
    ("<think></think>", 0.0),
]


@pytest.mark.parametrize("completion,expected", EN)
def test_language_consistency_en(completion, expected):
    assert build("language_consistency")([completion]) == [pytest.approx(expected)]


ZH = [
    ("<think>我们计算 2+2=4</think>", 1.0),  # 4 Han words; the formula is ignored
    ("<think>我爱Python</think>", 2 / 3),  # 2 Han + 1 non-target token
    ("<think>the answer 是 4</think>", 1 / 3),  # the, answer non-target; 是 target
    ("<think>日本語とカタカナ</think>", 0.75),  # 3 Han; kana make the token add 1 non-target
    ("<think>\\alpha 和 \\beta</think>", 1.0),  # LaTeX commands ignored
]


@pytest.mark.parametrize("completion,expected", ZH)
def test_language_consistency_zh(completion, expected):
    assert build("language_consistency", language="zh")([completion]) == [pytest.approx(expected)]


def test_chain_of_thought_span():
    assert chain_of_thought("a<think>b</think>c<think>d</think>") == "b"
    assert chain_of_thought("plain") == "plain"


def test_unknown_language():
    with pytest.raises(ValueError, match="'fr'"):
        build("language_consistency", language="fr")
