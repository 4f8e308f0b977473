"""Shape-of-the-text rewards: ``format`` (tutorial), ``format_strict`` and ``tag_count`` (open-r1),
``reasoning_steps`` (tutorial), ``repetition_penalty`` (open-r1 / "Demystifying Long CoT", App. C.2).

Two format rewards. ``format`` tolerates whitespace like the R1-Zero tutorial
(github.com/FareedKhan-dev/train-deepseek-r1); ``format_strict`` is open-r1's newline-exact rule, kept byte for
byte (quirks included) so results compare with open-r1 runs. None of these read dataset columns.
"""

from __future__ import annotations

import re
from typing import Optional

from stagewise.rewards.base import Row, SampleReward

# Tutorial: ^<think>.*?</think>\s*<answer>.*?</answer>$ with DOTALL|MULTILINE. Ours anchors at the true end of
# the text (\Z after optional whitespace) and allows leading whitespace: see Format's docstring.
FORMAT_RE = re.compile(r"\A\s*<think>.*?</think>\s*<answer>.*?</answer>\s*\Z", re.DOTALL)
_FORMAT_STRICT_RE = re.compile(r"^<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>$", re.DOTALL | re.MULTILINE)
STEP_RE = re.compile(r"(Step \d+:|^\d+\.|\n-|\n\*|First,|Second,|Next,|Finally,)", re.MULTILINE)


class Format(SampleReward):
    """1.0 iff the completion is ``<think>...</think>`` then ``<answer>...</answer>``, any whitespace (or none)
    between the blocks, as in the tutorial; else 0.0.

    Departures from the tutorial's regex, both so that the reward means what it says: (1) text after
    ``</answer>`` fails even on a new line (the tutorial's MULTILINE ``$`` accepted ``</answer>\\nanything``);
    (2) leading/trailing whitespace is accepted. Kept from the tutorial: the lazy ``.*?`` may span tags, so a second
    think or answer block still passes (``tag_count`` is the reward that counts tags); empty blocks pass.
    """

    def per_sample(self, completion: str, row: Row) -> float:
        return 1.0 if FORMAT_RE.match(completion) else 0.0


class FormatStrict(SampleReward):
    r"""open-r1's ``format_reward``: ``re.match`` of ``^<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>$``
    (DOTALL|MULTILINE). Exactly one newline between the blocks and inside each tag; no leading whitespace.
    Kept quirks: ``</answer>\nextra`` passes (MULTILINE ``$``), ``<think>\n</think>`` fails but
    ``<think>\n\n</think>`` passes."""

    def per_sample(self, completion: str, row: Row) -> float:
        return 1.0 if _FORMAT_STRICT_RE.match(completion) else 0.0


class TagCount(SampleReward):
    r"""open-r1's ``tag_count_reward``: +0.25 for each of ``<think>\n``, ``\n</think>\n``, ``\n<answer>\n``,
    ``\n</answer>`` occurring exactly once. Content is never checked."""

    PARTS = ("<think>\n", "\n</think>\n", "\n<answer>\n", "\n</answer>")

    def per_sample(self, completion: str, row: Row) -> float:
        return 0.25 * sum(completion.count(part) == 1 for part in self.PARTS)


class ReasoningSteps(SampleReward):
    r"""Tutorial's ``reasoning_steps_reward``: ``min(1, count / num_steps)`` over non-overlapping matches of
    ``Step N:``, a line starting ``N.``, ``\n-``, ``\n*``, ``First,``, ``Second,``, ``Next,``, ``Finally,``.

    MULTILINE as in the tutorial (open-r1 omits it, so only a numbered item at the very start counts there): every
    numbered line counts. Case-sensitive. Kept quirks: a line starting with a negative number matches ``\n-``, and a
    line starting with a decimal such as ``3.5`` matches ``^\d+\.``.
    """

    def __init__(self, num_steps: int = 3):
        if int(num_steps) < 1:
            raise ValueError(f"reasoning_steps: num_steps must be >= 1, got {num_steps}")
        self.num_steps = int(num_steps)

    def per_sample(self, completion: str, row: Row) -> float:
        return min(1.0, len(STEP_RE.findall(completion)) / self.num_steps)


class RepetitionPenalty(SampleReward):
    """open-r1's ``get_repetition_penalty_reward``: ``(1 - unique_ngrams / total_ngrams) * max_penalty`` over
    lower-cased whitespace words (punctuation stays attached). Empty text or fewer words than ``ngram_size`` -> 0.0.
    Defaults are the R1-Zero tutorial's (n=3, max -0.1; open-r1's script uses -1.0). Only English word splitting is
    provided (open-r1's ``zh`` mode needs jieba); a positive ``max_penalty`` is a ValueError, as in open-r1."""

    def __init__(self, ngram_size: int = 3, max_penalty: float = -0.1, language: str = "en"):
        if max_penalty > 0:
            raise ValueError(f"max_penalty {max_penalty} should not be positive")
        if language != "en":
            raise ValueError(f"repetition_penalty: language {language!r} is not supported (only 'en')")
        if int(ngram_size) < 1:
            raise ValueError(f"repetition_penalty: ngram_size must be >= 1, got {ngram_size}")
        self.ngram_size = int(ngram_size)
        self.max_penalty = float(max_penalty)

    def per_sample(self, completion: str, row: Row) -> Optional[float]:
        words = completion.lower().split()
        if len(words) < self.ngram_size:
            return 0.0
        ngrams = list(zip(*[words[i:] for i in range(self.ngram_size)]))
        return (1.0 - len(set(ngrams)) / len(ngrams)) * self.max_penalty + 0.0
