"""User rewards by import path (``my_pkg.rewards:fn``) or file path (``path/to/file.py:fn``).

The target may be:
* a function ``fn(completions, **columns) -> list[float | None]`` (TRL's convention): it is called on the whole
  batch with the config's ``params`` added as keyword arguments (a param wins over a column of the same name);
* a class: it is instantiated with ``params`` and the instance is used as the function. A subclass of
  ``stagewise.rewards.SampleReward`` gets the runner's per-sample isolation and may set ``executor = "process"``
  to run in the worker pool with a timeout (it is rebuilt there from the same spec).

Relative file paths are resolved against the current directory (the launch directory: this project's Hydra config
does not change directories). verl's DeepScaleR recipe asks users to edit its reward file; here they point at their own.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from stagewise.rewards.base import BatchReward, Reward, rows_of


class CustomRewardError(ImportError):
    pass


def is_custom(name: str) -> bool:
    return ":" in name


def load_target(spec: str) -> Any:
    """The object named by ``module:attr`` or ``file.py:attr``; errors name the spec and what is wrong with it."""
    where, _, attr = spec.rpartition(":")
    if not where or not attr:
        raise CustomRewardError(f"custom reward {spec!r} must look like 'my_pkg.module:fn' or 'path/to/file.py:fn'")
    if where.endswith(".py") or "/" in where or "\\" in where:
        module = _load_file(where, spec)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise CustomRewardError(f"custom reward {spec!r}: cannot import module {where!r}: {e}") from e
    try:
        return getattr(module, attr)
    except AttributeError:
        raise CustomRewardError(f"custom reward {spec!r}: {where!r} has no attribute {attr!r}") from None


def _load_file(where: str, spec: str):
    path = Path(where).expanduser().resolve()
    if not path.is_file():
        raise CustomRewardError(f"custom reward {spec!r}: file {where!r} not found (looked at {str(path)!r})")
    name = "stagewise_custom_reward_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise CustomRewardError(f"custom reward {spec!r}: importing {str(path)!r} failed: {e!r}") from e
    return module


class FunctionReward(BatchReward):
    """A user's batch function with its params bound; NaN results are read as None."""

    def __init__(self, fn: Callable[..., Any], params: Dict[str, Any], label: str):
        self.fn, self.params, self.label = fn, dict(params), label

    def __call__(self, completions: Sequence[str], **columns: Sequence[Any]) -> List[Optional[float]]:
        rows_of(completions, columns)
        out = self.fn(list(completions), **{**columns, **self.params})
        out = list(out)
        if len(out) != len(completions):
            raise ValueError(f"custom reward {self.label!r} returned {len(out)} values for {len(completions)} "
                             "completions")
        return [None if v is None or v != v else float(v) for v in out]  # NaN means "not scored" too


def build_custom(spec: str, params: Dict[str, Any]) -> Reward:
    target = load_target(spec)
    if inspect.isclass(target):
        instance = target(**params)
        if isinstance(instance, Reward):
            return instance
        if not callable(instance):
            raise CustomRewardError(f"custom reward {spec!r}: instances of {target.__name__} are not callable")
        return FunctionReward(instance, {}, spec)
    if not callable(target):
        raise CustomRewardError(f"custom reward {spec!r} is a {type(target).__name__}, not a function or class")
    return FunctionReward(target, params, spec)
