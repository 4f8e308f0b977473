"""What accumulates between two log lines of a training stage (SFT and GRPO both log through one)."""

from __future__ import annotations

import time
from typing import Dict, List, Optional

import numpy as np


class Window:
    """Everything between two log lines: per-step scalars (`means`: the mean, or the min / max for names ending
    in ``_min`` / ``_max``), per-sample arrays (`arrays`: concatenated over the steps, for exact statistics over
    every sample of the window), running totals (`total`) and the wall time since it was opened (`seconds`)."""

    def __init__(self) -> None:
        self.scalars: List[Dict[str, float]] = []
        self._arrays: List[Dict[str, np.ndarray]] = []
        self.totals: Dict[str, float] = {}
        self.start = time.time()

    def add(self, scalars: Dict[str, float], arrays: Optional[Dict[str, np.ndarray]] = None, **totals: float) -> None:
        self.scalars.append(scalars)
        if arrays is not None:
            self._arrays.append(arrays)
        for name, value in totals.items():
            self.totals[name] = self.totals.get(name, 0.0) + value

    def arrays(self) -> Dict[str, np.ndarray]:
        return {k: np.concatenate([a[k] for a in self._arrays]) for k in self._arrays[0]} if self._arrays else {}

    @property
    def steps(self) -> int:
        return len(self.scalars)

    def total(self, name: str) -> float:
        return self.totals.get(name, 0.0)

    def seconds(self) -> float:
        return time.time() - self.start

    def means(self) -> Dict[str, float]:
        out: Dict[str, float] = {}
        for k in dict.fromkeys(k for s in self.scalars for k in s):
            values = [s[k] for s in self.scalars if k in s]
            reduce = np.min if k.endswith("_min") else np.max if k.endswith("_max") else np.mean
            out[k] = float(reduce(values))
        return out
