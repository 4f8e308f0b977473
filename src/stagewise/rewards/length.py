"""Length-shaped rewards: ``length`` (Kimi k1.5), ``cosine`` (length-scaled correctness, "Demystifying Long CoT"
as in the tutorial), ``soft_overlong`` (DAPO eq. 13).

Decision: ``length`` and ``cosine`` count **characters** (as open-r1 and the tutorial do, so their constants
keep their meaning); ``soft_overlong`` counts **tokens** (DAPO's limits are token budgets). Token counts come from a
``completion_lengths`` column (ints) or, failing that, a ``completion_ids`` column (unpadded id lists, as TRL passes
them); the reward has no tokenizer. ``cosine`` clamps at ``max_len``; see its docstring.

Correctness for ``length`` and ``cosine`` is ``accuracy``'s (``math.is_correct``): math-verify, gold from
``answer``/``solution``, unparseable gold -> None for that sample (open-r1 treats it as *correct*, which pays
length bonuses for noise).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from typing import Any, Dict, List, Mapping, Optional, Sequence

from stagewise.rewards.base import GOLD_COLUMNS, Row, SampleReward, gold_of, gold_texts
from stagewise.rewards.math import is_correct


class Length(SampleReward):
    """Kimi k1.5 length reward: with L the character length and min/max over the completions of the same prompt,
    ``lam = 0.5 - (L - min) / (max - min)``; a correct answer gets ``lam``, a wrong one ``min(0, lam)``; every
    sample gets 0.0 when max == min.

    Departure from open-r1, which takes min/max over the whole call (i.e. across prompts): like the paper, we
    group by the ``prompt`` column when it is passed (equal prompts = one group); without it the call is one group.
    A sample whose correctness cannot be decided (unparseable gold, an error) scores None but its length still
    counts in its group's min/max. An empty (wrong) completion sets the minimum and so pushes correct answers down,
    as in open-r1 (reference case L10).
    """

    executor = "process"
    reads = GOLD_COLUMNS

    def per_sample(self, completion: str, row: Row) -> Optional[bool]:
        return is_correct(completion, gold_texts(gold_of(row, "length")))

    def reduce(self, values: List[Any], completions: Sequence[str], columns: Mapping[str, Sequence[Any]]
               ) -> List[Optional[float]]:
        groups: Dict[str, List[int]] = defaultdict(list)
        prompts = list(columns["prompt"]) if "prompt" in columns else None
        for i in range(len(completions)):
            groups[_group_key(prompts[i]) if prompts is not None else ""].append(i)
        out: List[Optional[float]] = [None] * len(completions)
        for members in groups.values():
            lengths = {i: len(completions[i]) for i in members}
            lo, hi = min(lengths.values()), max(lengths.values())
            for i in members:
                if values[i] is None:
                    continue
                if hi == lo:
                    out[i] = 0.0
                    continue
                lam = 0.5 - (lengths[i] - lo) / (hi - lo)
                out[i] = lam if values[i] else min(0.0, lam)
        return out


def _group_key(prompt: Any) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, default=str)


class Cosine(SampleReward):
    """Cosine length scaling of correctness (tutorial defaults): with ``p = min(L / max_len, 1)`` (characters),
    ``reward = lo + 0.5 * (hi - lo) * (1 + cos(pi * p))``; correct: lo=min_value_correct, hi=max_value_correct;
    wrong: lo=max_value_wrong, hi=min_value_wrong (swapped on purpose). So short correct -> 1.0, long correct ->
    0.8, short wrong -> -0.5, long wrong -> -0.1 (longer thinking is penalised less when wrong).

    Defaults are the R1-Zero tutorial's (FareedKhan-dev/train-deepseek-r1), not open-r1's script defaults, which
    make short wrong answers score 0 (better than long wrong ones, the opposite of the intent). Clamped at
    ``max_len``; open-r1 keeps following the cosine past it, so a correct answer of 2*max_len chars would again
    earn the short-answer maximum.
    Correctness is computed here (the tutorial's version needs an extra ``accuracy_rewards`` column and crashes
    without it); unparseable gold -> None (open-r1 gives 1.0). An empty completion is wrong with L=0 -> -0.5.
    """

    executor = "process"
    reads = GOLD_COLUMNS

    def __init__(self, min_value_wrong: float = -0.5, max_value_wrong: float = -0.1, min_value_correct: float = 0.8,
                 max_value_correct: float = 1.0, max_len: int = 1000):
        if max_len <= 0:
            raise ValueError(f"cosine: max_len must be positive, got {max_len}")
        self.min_value_wrong, self.max_value_wrong = float(min_value_wrong), float(max_value_wrong)
        self.min_value_correct, self.max_value_correct = float(min_value_correct), float(max_value_correct)
        self.max_len = int(max_len)

    def per_sample(self, completion: str, row: Row) -> Optional[float]:
        correct = is_correct(completion, gold_texts(gold_of(row, "cosine")))
        if correct is None:
            return None
        return self.scale(len(completion), correct)

    def scale(self, length: int, correct: bool) -> float:
        if correct:
            lo, hi = self.min_value_correct, self.max_value_correct
        else:
            lo, hi = self.max_value_wrong, self.min_value_wrong
        progress = min(length / self.max_len, 1.0)
        return lo + 0.5 * (hi - lo) * (1.0 + math.cos(math.pi * progress))


class SoftOverlong(SampleReward):
    """DAPO soft overlong punishment in tokens: 0 for ``L <= max - cache``; ``(max - cache - L) / cache`` (0 to -1)
    for ``max - cache < L <= max``; -1 beyond. Defaults are open-r1's (16384, 4096). Needs ``completion_lengths``
    (ints; preferred) or ``completion_ids`` (unpadded id lists); neither is an error naming both."""

    def __init__(self, max_completion_len: int = 16384, soft_punish_cache: int = 4096):
        if not 0 < soft_punish_cache <= max_completion_len:
            raise ValueError(f"soft_overlong: need 0 < soft_punish_cache ({soft_punish_cache}) <= "
                             f"max_completion_len ({max_completion_len})")
        self.max_completion_len = int(max_completion_len)
        self.soft_punish_cache = int(soft_punish_cache)

    def per_sample(self, completion: str, row: Row) -> float:
        if row.get("completion_lengths") is not None:
            length = int(row["completion_lengths"])
        elif row.get("completion_ids") is not None:
            length = len(row["completion_ids"])
        else:
            raise KeyError("soft_overlong needs a 'completion_lengths' (token counts) or 'completion_ids' column; "
                           f"got columns {sorted(row)}")
        limit = self.max_completion_len - self.soft_punish_cache
        if length <= limit:
            return 0.0
        if length <= self.max_completion_len:
            return (limit - length) / self.soft_punish_cache
        return -1.0
