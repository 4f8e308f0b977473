"""What every reward shares: the two shapes a reward can take, column handling, gold answers, error isolation.

A reward is called as ``fn(completions: list[str], **columns) -> list[float | None]``:
columns are dataset columns passed as keyword lists, one value per completion, and a function ignores the ones it
does not read. ``None`` means "cannot be scored" and is left out of the weighted sum.

Two shapes:
    SampleReward   scores one completion at a time (``per_sample``), then optionally looks at the whole batch
                   (``reduce``; the Kimi length reward needs the batch's min/max length). ``executor`` says how the
                   runner schedules ``per_sample``: ``inline`` in the caller, ``process`` in the worker pool with a
                   per-call timeout (sympy can hang), ``thread`` in a thread pool (network-bound, e.g. the judge).
    BatchReward    only sees the whole batch (a reward model scoring in batches, a user's plain function).

A sample whose ``per_sample`` raises gives ``None``; its traceback is logged once per (reward, error) and the rest
of the batch is scored as usual.
"""

from __future__ import annotations

import abc
import logging
import math
import threading
import time
import traceback
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from math_verify.errors import TimeoutException as MathVerifyTimeout

logger = logging.getLogger("stagewise.rewards")

Row = Mapping[str, Any]
Outcome = Tuple[bool, Any]  # (True, value) or (False, traceback text)
GOLD_COLUMNS = ("answer", "solution")


class RewardTimeout(BaseException):
    """Raised inside a reward when its own time limit fires. A BaseException (like math-verify's) so that the broad
    ``except Exception`` blocks inside sympy cannot swallow it."""


# Everything a reward may raise for one sample; KeyboardInterrupt and SystemExit still propagate.
CAUGHT = (Exception, RewardTimeout, MathVerifyTimeout)


class ErrorLog:
    """Log a failing reward's traceback once per (reward, last traceback line); repeats go to DEBUG."""

    def __init__(self) -> None:
        self._seen: set = set()
        self._lock = threading.Lock()
        self.first: Dict[str, str] = {}  # reward name -> the last line of its first error

    def report(self, name: str, tb: str) -> None:
        lines = str(tb).strip().splitlines() or ["<no traceback>"]
        key = (name, lines[-1])
        with self._lock:
            first = key not in self._seen
            self._seen.add(key)
            self.first.setdefault(name, lines[-1])
        if first:
            logger.warning("reward %r failed on a sample (scored None; later repeats of this error are "
                           "logged at DEBUG):\n%s", name, tb)
        else:
            logger.debug("reward %r failed again: %s", name, lines[-1])


class Reward(abc.ABC):
    """Base of every built reward. ``spec`` = (name, params) is set by ``stagewise.rewards.build`` so that a worker
    process can rebuild the same function."""

    executor: str = "inline"
    spec: Optional[Tuple[str, Dict[str, Any]]] = None
    # columns it cannot score without, as any-of groups, e.g. (("nums",), ("target",)); None = derived from
    # ``reads`` (gold-only readers need "answer" or "solution"); checked at data loading (RewardRunner.check_columns)
    needs: Optional[Tuple[Tuple[str, ...], ...]] = None

    @property
    def name(self) -> str:
        return self.spec[0] if self.spec else type(self).__name__

    @abc.abstractmethod
    def __call__(self, completions: Sequence[str], **columns: Sequence[Any]) -> List[Optional[float]]:
        """Score a batch."""


class SampleReward(Reward):
    """A reward computed one completion at a time; see the module docstring."""

    executor = "inline"  # inline | process | thread
    concurrency = 1  # threads used when executor == "thread"
    reads: Optional[Tuple[str, ...]] = None  # columns per_sample reads (None = all); the pool ships only these

    @abc.abstractmethod
    def per_sample(self, completion: str, row: Row) -> Any:
        """The per-completion part: a score (float/None), or whatever ``reduce`` turns into one."""

    def reduce(self, values: List[Any], completions: Sequence[str], columns: Mapping[str, Sequence[Any]]
               ) -> List[Optional[float]]:
        """Batch part; ``values`` holds ``per_sample`` results, None where it failed."""
        return [None if v is None else float(v) for v in values]

    def __call__(self, completions: Sequence[str], **columns: Sequence[Any]) -> List[Optional[float]]:
        """Serial scoring in the caller (threads for ``executor == "thread"``); the runner is the parallel path."""
        rows = rows_of(completions, columns)
        if self.executor == "thread":
            outcomes = run_threaded(self, completions, rows, self.concurrency)
        else:
            outcomes = [run_one(self, c, r) for c, r in zip(completions, rows)]
        errors = getattr(self, "_errors", None) or ErrorLog()
        self._errors = errors
        values = []
        for ok, value in outcomes:
            if not ok:
                errors.report(self.name, value)
            values.append(value if ok else None)
        return self.reduce(values, completions, columns)


class BatchReward(Reward):
    """A reward that scores the whole batch at once."""

    executor = "batch"


def run_one(reward: SampleReward, completion: str, row: Row) -> Outcome:
    try:
        return True, reward.per_sample(completion, row)
    except CAUGHT:
        return False, traceback.format_exc()


def run_threaded(reward: SampleReward, completions: Sequence[str], rows: Sequence[Row], concurrency: int,
                 timeout_s: Optional[float] = None) -> List[Outcome]:
    """``per_sample`` on ``concurrency`` threads, results in order, each call bounded by ``timeout_s``."""
    return run_bounded(lambda i: reward.per_sample(completions[i], rows[i]), len(completions), timeout_s,
                       concurrency, name=reward.name)


TIMEOUT_PREFIX = "RewardTimeout:"


def is_timeout(outcome_text: Any) -> bool:
    """Whether a failed outcome's text is a time limit (the runner's own, or a reward's RewardTimeout /
    math-verify's TimeoutException)."""
    text = str(outcome_text)
    last = text.strip().splitlines()[-1] if text.strip() else ""
    return text.startswith(TIMEOUT_PREFIX) or "RewardTimeout" in last or "TimeoutException" in last


def run_bounded(call: Callable[[int], Any], n: int, timeout_s: Optional[float], concurrency: int = 1,
                name: str = "reward") -> List[Outcome]:
    """``call(i)`` for ``i in range(n)`` on ``concurrency`` daemon threads, outcomes in order; each call gets
    ``timeout_s`` seconds from its start. A call that overruns is reported as ``RewardTimeout`` and its thread is
    abandoned (a Python thread cannot be killed: its late result is dropped) and replaced, so the batch goes on.
    Rewards that can spin in C for ever belong in the process pool (``executor = "process"``), which kills."""
    if n == 0:
        return []
    results: List[Optional[Outcome]] = [None] * n
    cond = threading.Condition()
    state = {"next": 0, "workers": 0}
    running: Dict[int, Tuple[int, float]] = {}  # worker id -> (index, start)
    abandoned: set = set()
    ids = iter(range(1 << 30))

    def worker(wid: int) -> None:
        while True:
            with cond:
                if wid in abandoned or state["next"] >= n:
                    running.pop(wid, None)
                    state["workers"] -= 1
                    cond.notify_all()
                    return
                i = state["next"]
                state["next"] += 1
                running[wid] = (i, time.monotonic())
            try:
                outcome: Outcome = (True, call(i))
            except CAUGHT:
                outcome = (False, traceback.format_exc())
            with cond:
                if wid in abandoned:
                    return
                results[i] = outcome
                running.pop(wid, None)

    def start() -> None:
        wid = next(ids)
        state["workers"] += 1
        threading.Thread(target=worker, args=(wid,), name=f"reward-{name}-{wid}", daemon=True).start()

    with cond:
        for _ in range(max(1, min(int(concurrency), n))):
            start()
        while state["workers"] > 0:
            now = time.monotonic()
            if timeout_s is not None:
                for wid, (i, t0) in list(running.items()):
                    if now - t0 >= timeout_s:
                        abandoned.add(wid)
                        running.pop(wid)
                        state["workers"] -= 1
                        results[i] = (False, f"{TIMEOUT_PREFIX} no result within {timeout_s:g}s (thread abandoned)")
                        if state["next"] < n:
                            start()
                deadlines = [t0 + timeout_s for _, t0 in running.values()]
                wait = max(0.001, min(deadlines) - now) if deadlines else 0.05
            else:
                wait = 1.0
            cond.wait(timeout=wait)
    return [r if r is not None else (False, "reward not run") for r in results]


# ------------------------------------------------------------------------------------------------ columns
def rows_of(completions: Sequence[str], columns: Mapping[str, Sequence[Any]]) -> List[Dict[str, Any]]:
    """Check the batch and turn keyword columns into one dict per completion. Errors name the bad column/index."""
    if isinstance(completions, (str, bytes)):
        raise TypeError("completions must be a list of strings, got a single string")
    completions = list(completions)
    for i, c in enumerate(completions):
        if not isinstance(c, str):
            raise TypeError(f"completions[{i}] is a {type(c).__name__}, expected str (decode completions first)")
    n = len(completions)
    lists = {}
    for key, values in columns.items():
        if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
            raise TypeError(f"column {key!r} must hold one value per completion, got a {type(values).__name__}")
        values = list(values)
        if len(values) != n:
            raise ValueError(f"column {key!r} has {len(values)} values for {n} completions")
        lists[key] = values
    return [{k: v[i] for k, v in lists.items()} for i in range(n)]


def is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def gold_of(row: Row, reward: str) -> Any:
    """The gold answer: the ``answer`` column when it has a value (a short final answer parses more reliably),
    else ``solution`` (possibly a worked solution). Neither column present is an error naming both."""
    if not any(k in row for k in GOLD_COLUMNS):
        raise KeyError(f"reward {reward!r} needs a 'solution' or 'answer' column; got columns {sorted(row)}")
    for key in GOLD_COLUMNS:
        if not is_missing(row.get(key)):
            return row[key]
    return None


def gold_texts(value: Any) -> List[str]:
    """Gold answers as strings: a list/array of answers (any may match, as in DeepScaleR) or one value."""
    if is_missing(value):
        return []
    if not isinstance(value, (str, bytes)) and hasattr(value, "__iter__") and not isinstance(value, Mapping):
        return [s for s in (_as_text(v) for v in value if not is_missing(v)) if s.strip()]
    return [_as_text(value)]


def _as_text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def prompt_text(prompt: Any) -> str:
    """A prompt column value as text: a string, or a list of chat messages rendered one per line."""
    if prompt is None:
        return ""
    if isinstance(prompt, str):
        return prompt
    messages = list(prompt)
    if len(messages) == 1 and isinstance(messages[0], Mapping):
        return str(messages[0].get("content", ""))
    return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" if isinstance(m, Mapping) else str(m)
                     for m in messages)
