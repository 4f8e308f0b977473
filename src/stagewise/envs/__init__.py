"""Environments: the env API, single-turn and code-execution envs, and the code sandbox (`envs.sandbox`)."""
