"""What a GRPO step measures besides its loss: wall time per phase, reward / length / format statistics over every
generated sample, and memory."""

from __future__ import annotations

import contextlib
import resource
import time
from typing import Dict, Sequence

import numpy as np
import torch

from stagewise.tracking.console import format_indicators


class PhaseTimer:
    """Wall-clock seconds per phase of one step (generate, score, logprobs, update, sync, step; multi-turn: env,
    the part of generate spent in env steps)."""

    def __init__(self) -> None:
        self.seconds: Dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds


def per_sample_arrays(batch, total: torch.Tensor, per_fn: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Per-completion numbers every rank contributes to the step's metrics (NaN = a reward returned None), from a
    `stagewise.rollout.RolloutBatch` and its rewards."""
    fmt = [format_indicators(t) for t in batch.texts]
    arrays = {f"reward/{name}": v for name, v in per_fn.items()}
    arrays.update({
        "reward/total": total,
        "completion_tokens": torch.tensor([len(c) for c in batch.completion_ids], dtype=torch.float32),
        "prompt_tokens": torch.tensor([len(p) for p in batch.prompt_ids], dtype=torch.float32),
        "truncated": torch.tensor(batch.truncated, dtype=torch.float32),
        "chars": torch.tensor([len(t) for t in batch.texts], dtype=torch.float32),
        "format_ok": torch.tensor([f[0] for f in fmt], dtype=torch.float32),
        "indicators": torch.tensor([f[1] for f in fmt], dtype=torch.float32),
    })
    for name, values in batch.env_columns.items():  # multi-turn facts (turns, code_errors ...)
        if values and isinstance(values[0], (bool, int, float)):
            arrays[f"env/{name}"] = torch.tensor(values, dtype=torch.float32)
    return arrays


def rollout_statistics(a: Dict[str, np.ndarray], reward_names: Sequence[str], seconds: float) -> Dict[str, float]:
    """The reward, length, format and multi-turn statistics of every sample generated in a window (``a``: the
    per-sample arrays of `per_sample_arrays`, concatenated over the window's steps and ranks; ``seconds``: the
    window's step time): exact over the samples, not means of per-step means. NaN rewards (a function returned
    None) are left out and counted."""
    out: Dict[str, float] = {}
    for name in list(reward_names) + ["total"]:
        v = a[f"reward/{name}"]
        scored = v[~np.isnan(v)]
        stats = ({"mean": scored.mean(), "std": scored.std(), "min": scored.min(), "max": scored.max()}
                 if scored.size else dict.fromkeys(("mean", "std", "min", "max"), float("nan")))
        out.update({f"reward/{name}/{s}": float(x) for s, x in stats.items()})
        if name != "total":
            out[f"reward/{name}/none"] = float(np.isnan(v).sum())
    out.update({k: float(v.sum()) for k, v in a.items() if k.startswith("rewards/")})  # errors, timeouts
    lengths, truncated = a["completion_tokens"], a["truncated"].astype(bool)
    done = lengths[~truncated]
    out.update({
        "completions/mean_length": float(lengths.mean()),
        "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()),
        "completions/clipped_ratio": float(truncated.mean()),
        "completions/mean_terminated_length": float(done.mean()) if done.size else 0.0,
        "completions/min_terminated_length": float(done.min()) if done.size else 0.0,
        "completions/max_terminated_length": float(done.max()) if done.size else 0.0,
        "completions/mean_chars": float(a["chars"].mean()),
        "quality/format_ok": float(a["format_ok"].sum()),
        "quality/num_completions": float(a["format_ok"].size),
        "quality/format_compliance": float(a["format_ok"].mean()),
        "quality/reasoning_indicators": float(a["indicators"].mean()),
    })
    env = {k: v for k, v in a.items() if k.startswith("env/")}  # multi-turn (env=code_sandbox)
    out.update({f"{k}/mean": float(v.mean()) for k, v in env.items()})
    if "env/code_calls" in env:
        calls = float(env["env/code_calls"].sum())
        out["env/code_error_rate"] = float(env["env/code_errors"].sum()) / calls if calls else 0.0
    out["perf/samples_per_s"] = lengths.size / seconds if seconds else 0.0
    out["perf/completion_tokens_per_s"] = float(lengths.sum()) / seconds if seconds else 0.0
    return out


def memory_metrics() -> Dict[str, float]:
    if torch.cuda.is_available():
        return {"memory/gpu_max_allocated_gb": torch.cuda.max_memory_allocated() / 2**30,
                "memory/gpu_reserved_gb": torch.cuda.memory_reserved() / 2**30}
    return {"memory/rss_gb": _rss_bytes() / 2**30,
            "memory/max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30}


def _rss_bytes() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
