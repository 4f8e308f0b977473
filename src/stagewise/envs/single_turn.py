"""``env=single_turn``: one prompt, one completion. The first step ends the episode and says nothing back.

GRPO's single-turn path does not need an env at all (it calls the rollout backend directly); this class exists so
that code written against the env API (the agent loop, evaluation) runs unchanged on single-turn tasks.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from stagewise.envs.base import Env, Step


class SingleTurnEnv(Env):
    name = "single_turn"

    def __init__(self) -> None:
        self.task: Optional[Mapping[str, Any]] = None
        self.done = False

    def reset(self, task: Optional[Mapping[str, Any]] = None) -> str:
        self.task, self.done = task, False
        return ""

    def step(self, action: str) -> Step:
        if self.done:
            raise RuntimeError("SingleTurnEnv.step() after the episode ended; call reset() first")
        self.done = True
        return Step(observation="", reward=0.0, done=True, info={"turns": 1})
