"""Offline data generators, used as ``path: generator:<name>`` in a data source.

Each generator is ``fn(n, split="train", seed=0, **kwargs) -> list[dict]`` and is deterministic in its arguments.
Rows carry both forms, so one generator serves SFT and GRPO: ``messages`` (user question + worked assistant
answer in the R1 ``<think>``/``<answer>`` format) and ``problem`` + the ground truth (``answer``; ``nums`` and
``target`` for countdown). ``split`` is ``train`` or ``test``: every task is assigned to exactly one split by a hash
of the task itself (`task_split`), so train and held-out rows never overlap whatever the seeds or sizes.

=============  ==========================================================================================
name           kwargs
=============  ==========================================================================================
arithmetic     ``n``, ``max_value`` (99): "What is a + b + c?" with a, b, c uniform in [0, max_value]
countdown      ``n``, ``num_numbers`` ([3, 4]), ``max_number`` (99), ``max_target`` (100): TinyZero countdown
analysis_tasks ``n``, ``workspace_root``, ``mix``, ``file_kinds``: CSV/XLSX/SQLite analysis tasks in DeepAnalyze's
               RL schema, files written under ``workspace_root`` (see `analysis_tasks`)
=============  ==========================================================================================
"""

from __future__ import annotations

from typing import Any, Callable

from stagewise.data.generators.analysis_tasks import analysis_tasks
from stagewise.data.generators.arithmetic import arithmetic
from stagewise.data.generators.common import HELD_OUT_PER_MILLE, task_split
from stagewise.data.generators.countdown import countdown

GENERATORS: dict[str, Callable[..., list[dict[str, Any]]]] = {"arithmetic": arithmetic, "countdown": countdown,
                                                               "analysis_tasks": analysis_tasks}

__all__ = ["GENERATORS", "HELD_OUT_PER_MILLE", "analysis_tasks", "arithmetic", "countdown", "task_split"]
