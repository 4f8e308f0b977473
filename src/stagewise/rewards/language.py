"""DeepSeek-R1's language-consistency reward (§2.3.2): the proportion of target-language words in the chain of
thought. The paper defines neither "word" nor the CoT span; this is the convention of reference §8, written out:

* CoT: the text between the first ``<think>`` and the next ``</think>`` (to the end if ``</think>`` is missing,
  e.g. a truncated completion); with no ``<think>`` but a ``</think>`` (a template that pre-fills ``<think>``),
  the text before it; with neither tag, the whole completion.
* Words: whitespace-separated tokens, after deleting LaTeX commands (``\\frac``, ``\\alpha``...). A token with no
  letters left (numbers, operators, LaTeX-only) is ignored.
* ``en``: a token is a target word if all its letters are ASCII Latin, else a non-target word (``café``,
  ``число``, ``数学`` are non-target).
* ``zh``: every Han character is one target word; a token that also has non-Han letters (Latin, kana, ...) adds one
  non-target word. ``我爱Python`` -> 2 target, 1 non-target.
* Reward = target words / counted words; 0.0 when nothing is counted (an empty or all-math CoT earns no credit).
"""

from __future__ import annotations

import re
import string
import unicodedata

from stagewise.rewards.base import Row, SampleReward

_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
_ASCII_LETTERS = frozenset(string.ascii_letters)
LANGUAGES = ("en", "zh")


def chain_of_thought(text: str) -> str:
    start = text.find("<think>")
    if start >= 0:
        start += len("<think>")
        end = text.find("</think>", start)
        return text[start:] if end < 0 else text[start:end]
    end = text.find("</think>")
    return text if end < 0 else text[:end]


def is_han(ch: str) -> bool:
    return unicodedata.name(ch, "").startswith(("CJK UNIFIED IDEOGRAPH", "CJK COMPATIBILITY IDEOGRAPH"))


def count_words(text: str, language: str) -> tuple:
    """(target words, counted words) under the module's rule."""
    target = counted = 0
    for token in text.split():
        letters = [c for c in _LATEX_COMMAND.sub("", token) if c.isalpha()]
        if not letters:
            continue
        if language == "en":
            counted += 1
            target += all(c in _ASCII_LETTERS for c in letters)
        else:
            han = sum(is_han(c) for c in letters)
            other = han < len(letters)
            target += han
            counted += han + other
    return target, counted


class LanguageConsistency(SampleReward):
    """Share of target-language words in the chain of thought (see the module docstring for the word rule).
    ``language`` is ``en`` or ``zh``."""

    def __init__(self, language: str = "en"):
        if language not in LANGUAGES:
            raise ValueError(f"language_consistency: language {language!r} is not one of {LANGUAGES}")
        self.language = language

    def per_sample(self, completion: str, row: Row) -> float:
        target, counted = count_words(chain_of_thought(completion), self.language)
        return target / counted if counted else 0.0
