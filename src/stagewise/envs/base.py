"""The environment API: what the multi-turn agent loop (`stagewise.rollout.multiturn`) talks to.

    env = build_env(cfg.env)        # one env per trajectory
    env.reset(task)                 # task: the dataset row (workspace_id, data, workspace_root, reward_spec, ...)
    obs, reward, done, info = env.step(turn_text)    # the text the policy generated this turn
    env.close()                     # or `with env:`; releases the sandbox process and the workspace copy

Gym-style, with text in and text out: an action is one turn of the policy (decoded, tags kept), an observation is
the text the environment appends to the trajectory (with loss mask 0). ``step`` returns a `Step`, a named tuple,
so both ``obs, reward, done, info = env.step(a)`` and ``env.step(a).observation`` work.

Rewards. ``Step.reward`` is the environment's per-step reward; the envs here return 0.0 for every step, as
DeepAnalyze's gym does for intermediate steps, and the trajectory is scored once at the end by the reward registry
(``reward=deepanalyze``), so that weights, failure isolation and metrics are the same for every stage. The ``info``
dict carries the facts a reward needs (executions, errors, timeouts), which the agent loop passes on as columns.
"""

from __future__ import annotations

import abc
from typing import Any, Dict, Mapping, NamedTuple, Optional


class Step(NamedTuple):
    observation: str  # text to append to the trajectory ("" = nothing)
    reward: float
    done: bool
    info: Dict[str, Any]


class Env(abc.ABC):
    """One episode at a time. Subclasses implement `reset` and `step`; `close` releases resources."""

    name: str = "env"

    @abc.abstractmethod
    def reset(self, task: Optional[Mapping[str, Any]] = None) -> str:
        """Start an episode on one dataset row. Returns an initial observation to append after the prompt ("" for
        the envs here: the prompt itself comes from the data layer)."""

    @abc.abstractmethod
    def step(self, action: str) -> Step:
        """Consume one turn of the policy; return what the environment says back."""

    def close(self) -> None:
        """Release what `reset` acquired. Idempotent."""

    def __enter__(self) -> "Env":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
