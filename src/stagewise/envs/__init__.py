"""Environments: the env API, single-turn and code-execution envs, and the code sandbox (`envs.sandbox`).

    env = stagewise.envs.build_env(cfg.env)     # env.name: single_turn | code_sandbox
    stagewise.envs.available_envs()             # -> sorted names

See README.md in this folder ("Agentic RL") for the API and the multi-turn agent loop that drives it.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List

from stagewise.envs.base import Env, Step
from stagewise.envs.code_sandbox import CodeSandboxEnv
from stagewise.envs.single_turn import SingleTurnEnv

ENVS: Dict[str, Callable[[Any], Env]] = {
    "single_turn": lambda env_cfg: SingleTurnEnv(),
    "code_sandbox": CodeSandboxEnv.from_config,
}


def available_envs() -> List[str]:
    return sorted(ENVS)


def build_env(env_cfg: Any) -> Env:
    """A fresh env for one trajectory, from an ``env`` config (`stagewise.config.EnvConfig`)."""
    name = env_cfg.name
    if name not in ENVS:
        raise ValueError(f"env.name={name!r} is not one of {', '.join(available_envs())}")
    return ENVS[name](env_cfg)


__all__ = ["ENVS", "CodeSandboxEnv", "Env", "SingleTurnEnv", "Step", "available_envs", "build_env"]
