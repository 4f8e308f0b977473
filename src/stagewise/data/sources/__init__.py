"""Source adapters: one file per dataset family, each a pure function ``row -> {"messages": ..., ...}``.

An `Adapter` names the columns it consumes (dropped from the output) and the columns it adds; every other column
of the source passes through unchanged. ``adapter: auto`` picks one from the column names (`detect_adapter`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from datasets import Value

from stagewise.data.sources.bespoke_stratos import bespoke_stratos_adapter
from stagewise.data.sources.chat import messages_adapter, prompt_completion_adapter
from stagewise.data.sources.countdown import countdown_adapter, countdown_prompt
from stagewise.data.sources.deepanalyze import check_execute_spans, deepanalyze_adapter, deepanalyze_rl_adapter
from stagewise.data.sources.numina_tir import numina_tir_adapter


@dataclass(frozen=True)
class Adapter:
    name: str
    fn: Callable[[dict[str, Any]], dict[str, Any]]
    consumes: tuple[str, ...]
    adds: dict[str, Any] = field(default_factory=dict)  # column -> datasets feature


ADAPTERS: dict[str, Adapter] = {
    a.name: a
    for a in [
        Adapter("messages", messages_adapter, ("messages",)),
        Adapter("prompt_completion", prompt_completion_adapter, ("prompt", "completion", "messages")),
        Adapter("bespoke_stratos", bespoke_stratos_adapter, ("system", "conversations", "messages")),
        Adapter("numina_tir", numina_tir_adapter, ("messages",)),
        Adapter("deepanalyze", deepanalyze_adapter, ("messages",)),
        Adapter("deepanalyze_rl", deepanalyze_rl_adapter, ("prompt", "messages")),
        Adapter("countdown", countdown_adapter, ("messages",), {"problem": Value("string")}),
    ]
}


def detect_adapter(columns: list[str], where: str) -> str:
    """Pick an adapter from column names; the first matching rule wins.

    ==========================================  ==================
    columns                                     adapter
    ==========================================  ==================
    ``conversations``                           bespoke_stratos
    ``nums`` and ``target``                     countdown
    ``prompt`` and (``reward_spec``|``env_class``)  deepanalyze_rl
    ``problem``                                 numina_tir
    ``messages``                                messages
    ``prompt``                                  prompt_completion
    ==========================================  ==================

    DeepAnalyze SFT files are plain ``messages`` files; ``auto`` reads them with the generic adapter (execute
    spans are masked either way) and ``adapter: deepanalyze`` adds the tag-balance check.
    """
    cols = set(columns)
    if "conversations" in cols:
        return "bespoke_stratos"
    if {"nums", "target"} <= cols:
        return "countdown"
    if "prompt" in cols and cols & {"reward_spec", "env_class"}:
        return "deepanalyze_rl"
    if "problem" in cols:
        return "numina_tir"
    if "messages" in cols:
        return "messages"
    if "prompt" in cols:
        return "prompt_completion"
    raise ValueError(
        f"cannot detect the schema of {where}: columns {sorted(cols)}; expected messages, conversations, problem, "
        f"prompt(+completion) or nums+target. Set the source's adapter to one of {', '.join(ADAPTERS)}"
    )


__all__ = ["ADAPTERS", "Adapter", "check_execute_spans", "countdown_prompt", "detect_adapter"]
