"""Shared by the generators: the split a task belongs to, and a seeded RNG per (generator, split, seed)."""

from __future__ import annotations

import hashlib
import random

# Share of all tasks reserved for the held-out split, in thousandths. Fixed (not a kwarg) so that a train source
# and a test source can never disagree about it, which is what guarantees they do not overlap.
HELD_OUT_PER_MILLE = 100
SPLITS = ("train", "test")


def task_split(key: str) -> str:
    """``test`` for HELD_OUT_PER_MILLE/1000 of all task keys, else ``train``; a pure function of the key."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return "test" if h % 1000 < HELD_OUT_PER_MILLE else "train"


def check_split(split: str, generator: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"generator:{generator}: split must be one of {SPLITS}, got {split!r}")


def rng_for(generator: str, split: str, seed: int) -> random.Random:
    return random.Random(f"{generator}:{split}:{seed}")  # str seeds hash with sha512: stable across processes
