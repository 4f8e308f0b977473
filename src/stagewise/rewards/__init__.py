"""The reward registry: every reward of the four recipes, built by name, composable through ``RewardRunner``.

    fn = stagewise.rewards.build("cosine", max_len=2000)
    fn(completions, solution=golds)                 # -> list[float | None], None = cannot be scored
    stagewise.rewards.available()                    # -> sorted names
    stagewise.rewards.build("my_pkg.rewards:fn")    # or "path/to/file.py:fn": a user's own reward

| name                 | source                      | columns read                        | file          |
| -------------------- | --------------------------- | ----------------------------------- | ------------- |
| accuracy             | open-r1 (math-verify)       | answer or solution                  | math.py       |
| boxed_math           | DeepScaleR                  | answer or solution                  | math.py       |
| answer_tag           | DeepScaleR tags             | answer or solution                  | math.py       |
| format               | R1-Zero tutorial [1]        | -                                   | format.py     |
| format_strict        | open-r1                     | -                                   | format.py     |
| tag_count            | open-r1                     | -                                   | format.py     |
| reasoning_steps      | tutorial                    | -                                   | format.py     |
| repetition_penalty   | open-r1 / tutorial          | -                                   | format.py     |
| length               | Kimi k1.5                   | answer or solution, prompt (groups) | length.py     |
| cosine               | tutorial / open-r1          | answer or solution                  | length.py     |
| soft_overlong        | DAPO                        | completion_lengths or completion_ids| length.py     |
| countdown            | TinyZero                    | nums, target                        | countdown.py  |
| deepanalyze          | DeepAnalyze RL [2]          | reward_spec, data_source, input_seq | deepanalyze.py |
| language_consistency | DeepSeek-R1 §2.3.2          | -                                   | language.py   |
| judge                | LLM-as-judge (OpenAI API)   | prompt, answer or solution          | judge.py      |
| reward_model         | HF sequence classification  | prompt                              | reward_model.py |

[1] github.com/FareedKhan-dev/train-deepseek-r1 ("tutorial" below too)  [2] github.com/ruc-datalab/DeepAnalyze

Each function's docstring states its rule and every decision taken where the references disagree.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, List

from stagewise.rewards.base import BatchReward, Reward, RewardTimeout, SampleReward
from stagewise.rewards.countdown import Countdown
from stagewise.rewards.custom import CustomRewardError, build_custom, is_custom
from stagewise.rewards.deepanalyze import DeepAnalyze
from stagewise.rewards.format import Format, FormatStrict, ReasoningSteps, RepetitionPenalty, TagCount
from stagewise.rewards.judge import Judge
from stagewise.rewards.language import LanguageConsistency
from stagewise.rewards.length import Cosine, Length, SoftOverlong
from stagewise.rewards.math import Accuracy, AnswerTag, BoxedMath
from stagewise.rewards.reward_model import RewardModel
from stagewise.rewards.runner import RewardResult, RewardRunner

REGISTRY: Dict[str, Callable[..., Reward]] = {
    "accuracy": Accuracy,
    "boxed_math": BoxedMath,
    "answer_tag": AnswerTag,
    "format": Format,
    "format_strict": FormatStrict,
    "tag_count": TagCount,
    "reasoning_steps": ReasoningSteps,
    "repetition_penalty": RepetitionPenalty,
    "length": Length,
    "cosine": Cosine,
    "soft_overlong": SoftOverlong,
    "countdown": Countdown,
    "deepanalyze": DeepAnalyze,
    "language_consistency": LanguageConsistency,
    "judge": Judge,
    "reward_model": RewardModel,
}


def available() -> List[str]:
    return sorted(REGISTRY)


def build(name: str, **params: Any) -> Reward:
    """A reward by registry name or custom path, with its params checked against its signature."""
    if name in REGISTRY:
        factory = REGISTRY[name]
        _check_params(name, factory, params)
        reward = factory(**params)
    elif is_custom(name):
        reward = build_custom(name, params)
    else:
        raise KeyError(f"unknown reward {name!r}; available: {', '.join(available())}; or give a custom "
                       "'my_pkg.module:fn' / 'path/to/file.py:fn'")
    reward.spec = (name, dict(params))
    return reward


def _check_params(name: str, factory: Callable[..., Any], params: Dict[str, Any]) -> None:
    signature = inspect.signature(factory)
    accepted = [p for p in signature.parameters if p != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise TypeError(f"reward {name!r} got unknown param(s) {unknown}; accepted: {accepted or 'none'}")
    missing = [p.name for p in signature.parameters.values()
               if p.default is inspect.Parameter.empty and p.name not in params]
    if missing:
        raise TypeError(f"reward {name!r} needs param(s) {missing}")


__all__ = [
    "available", "build", "REGISTRY", "Reward", "SampleReward", "BatchReward", "RewardTimeout",
    "RewardRunner", "RewardResult", "CustomRewardError",
    "Accuracy", "AnswerTag", "BoxedMath", "Countdown", "Cosine", "Format", "FormatStrict", "Judge",
    "LanguageConsistency", "Length", "ReasoningSteps", "RepetitionPenalty", "RewardModel", "SoftOverlong", "TagCount",
]
