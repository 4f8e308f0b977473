"""``RewardRunner``: the weighted rewards of a ``RewardConfig``, scored robustly and in parallel, with metrics.

    runner = RewardRunner(cfg.reward)           # builds every function once (fails fast on bad names/params)
    result = runner(completions, **columns)     # RewardResult(total, per_fn, metrics)
    runner.close()                              # or use it as a context manager

Scheduling, by each reward's ``executor``; every call is bounded by ``timeout_s``:
    process  per sample, in a worker pool (``num_workers``) with a hard ``timeout_s`` per sample (sympy can hang):
             an overrunning worker is killed; several such rewards share the pool
    thread   per sample, on ``reward.concurrency`` threads, ``timeout_s`` per sample (the judge also bounds its own
             requests with socket timeouts and a retry budget)
    inline   per sample, on one helper thread, ``timeout_s`` per sample (regex/arithmetic rewards: microseconds)
    batch    one call for the whole batch (users' plain functions: ``timeout_s`` for the call; the reward model:
             ``timeout_s`` per sample); if it raises, it is retried one sample at a time so the failure is pinned to
             its samples (a timeout is not retried)
An in-process call that overruns is abandoned (its thread cannot be killed; its late result is dropped).
The pool and the thread rewards run in the background while inline and batch rewards run in the caller.

Failure isolation: a sample whose reward raises, times out or kills its worker scores None for that function; the
traceback is logged once per (function, error) and the count goes to ``rewards/<fn>/errors``. The step goes on,
unless the function failed on every sample of ``reward.max_failed_steps`` calls in a row: then `RewardFailedError`
stops the stage, naming the function and its first error.

``total`` is the weighted sum over the functions that scored the sample (None skipped, as TRL does). A row that
*no* function scored gets total 0.0 (TRL's NaN-sum gives the same), is counted in ``reward/total/unscored`` and
logged as a warning, so it never poisons a group's advantage with NaN.

Metrics (population std, ddof=0; NaN when a function scored nothing): ``reward/<fn>/{mean,std,min,max}``,
``reward/<fn>/none`` (count of None, errors included), ``rewards/<fn>/errors`` (samples whose call failed, time
limits included), ``rewards/<fn>/timeouts`` (of those, the ones that hit ``timeout_s``), ``reward/total/{mean,std}``,
``reward/total/unscored``. ``<fn>`` is the display name: the registry name, the attribute name of a custom
``module:fn``, or the function config's ``alias`` if the schema has one; a name used twice becomes ``name_2``...
"""

from __future__ import annotations

import logging
import math
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Sequence

from stagewise.rewards.base import (CAUGHT, GOLD_COLUMNS, ErrorLog, Outcome, Reward, SampleReward, is_timeout, rows_of,
                                    run_bounded, run_threaded)
from stagewise.rewards.custom import FunctionReward
from stagewise.rewards.pool import WorkerPool

if TYPE_CHECKING:
    from stagewise.config import RewardConfig, RewardFnConfig

logger = logging.getLogger("stagewise.rewards")


class RewardFailedError(RuntimeError):
    """A reward function failed on every sample of ``reward.max_failed_steps`` batches in a row."""


@dataclass
class RewardResult:
    total: List[float]
    per_fn: Dict[str, List[Optional[float]]]
    metrics: Dict[str, float]
    failed: Dict[str, List[bool]] = field(default_factory=dict)  # per sample: raised, timed out or worker died
    timed_out: Dict[str, List[bool]] = field(default_factory=dict)  # per sample: hit ``timeout_s``

    def sample_flags(self) -> Dict[str, List[float]]:
        """``rewards/<fn>/errors`` and ``rewards/<fn>/timeouts`` as one 0/1 value per sample (a training loop
        gathers them over ranks and sums them over its logging window)."""
        out: Dict[str, List[float]] = {}
        for name, flags in self.failed.items():
            out[f"rewards/{name}/errors"] = [float(f) for f in flags]
            out[f"rewards/{name}/timeouts"] = [float(f) for f in self.timed_out.get(name, [False] * len(flags))]
        return out


@dataclass
class _Entry:
    name: str
    weight: float
    reward: Reward


def reward_config(cfg: Any) -> "RewardConfig":
    """A `RewardConfig` from itself, the composed ``reward`` node or a plain dict, checked against the schema (an
    unknown key or a wrong type fails here, naming it), so the runner reads typed fields only."""
    from omegaconf import OmegaConf

    from stagewise.config import RewardConfig

    if isinstance(cfg, RewardConfig):
        return cfg
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RewardConfig), cfg))  # type: ignore[return-value]


def display_names(functions: Sequence["RewardFnConfig"]) -> List[str]:
    """Unique metric names: alias, else the registry name, else ``fn`` of ``module:fn``; repeats get ``_2``, ``_3``."""
    names: List[str] = []
    for f in functions:
        base = f.alias or f.name.rpartition(":")[2]
        name, k = base, 1
        while name in names:
            k += 1
            name = f"{base}_{k}"
        names.append(name)
    return names


def _stats(values: Sequence[float]) -> Dict[str, float]:
    if not values:
        nan = float("nan")
        return {"mean": nan, "std": nan, "min": nan, "max": nan}
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return {"mean": mean, "std": std, "min": min(values), "max": max(values)}


class RewardRunner:
    def __init__(self, cfg: Any):
        from stagewise.rewards import build

        cfg = reward_config(cfg)
        self.timeout_s = float(cfg.timeout_s)
        self.num_workers = max(1, cfg.num_workers)
        self.allow_missing_columns = cfg.allow_missing_columns
        self.entries: List[_Entry] = []
        for f, name in zip(cfg.functions, display_names(cfg.functions)):
            self.entries.append(_Entry(name, float(f.weight), build(f.name, **f.params)))
        self._pool: Optional[WorkerPool] = None
        self._errors = ErrorLog()
        self.max_failed_calls = int(cfg.max_failed_steps)
        self._failed_in_a_row: Dict[str, int] = {e.name: 0 for e in self.entries}

    @property
    def names(self) -> List[str]:
        return [e.name for e in self.entries]

    @property
    def pool(self) -> WorkerPool:
        if self._pool is None:
            self._pool = WorkerPool(self.num_workers)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> "RewardRunner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ scoring
    def __call__(self, completions: Sequence[str], **columns: Sequence[Any]) -> RewardResult:
        completions = list(completions)
        rows = rows_of(completions, columns)
        columns = {k: list(v) for k, v in columns.items()}
        n = len(completions)
        outcomes: Dict[str, List[Outcome]] = {}
        scores: Dict[str, List[Optional[float]]] = {}
        failed: Dict[str, List[bool]] = {e.name: [False] * n for e in self.entries}
        timed_out: Dict[str, List[bool]] = {e.name: [False] * n for e in self.entries}

        def kind(e: _Entry) -> str:
            if not isinstance(e.reward, SampleReward):
                return "batch"
            if e.reward.executor == "process" and e.reward.spec is not None:
                return "process"
            return "thread" if e.reward.executor == "thread" else "inline"

        pooled = [e for e in self.entries if kind(e) == "process"]
        threaded = [e for e in self.entries if kind(e) == "thread"]
        with ThreadPoolExecutor(max_workers=1 + len(threaded), thread_name_prefix="reward-runner") as background:
            pool_job = background.submit(self._run_pool, pooled, completions, rows) if pooled and rows else None
            thread_jobs = {e.name: background.submit(run_threaded, e.reward, completions, rows,
                                                     getattr(e.reward, "concurrency", 1), self.timeout_s)
                           for e in threaded}
            for e in self.entries:
                if kind(e) == "inline":
                    outcomes[e.name] = run_bounded(lambda i, r=e.reward: r.per_sample(completions[i], rows[i]), n,
                                                   self.timeout_s, 1, name=e.name)
                elif kind(e) == "batch":
                    scores[e.name] = self._run_batch(e, completions, columns, rows, failed[e.name],
                                                     timed_out[e.name])
            if pool_job is not None:
                outcomes.update(pool_job.result())
            for name, job in thread_jobs.items():
                outcomes[name] = job.result()

        for e in self.entries:
            if e.name in scores:
                continue
            values = []
            for i, (ok, value) in enumerate(outcomes.get(e.name, [])):
                if not ok:
                    failed[e.name][i] = True
                    timed_out[e.name][i] = is_timeout(value)
                    self._errors.report(e.name, value)
                values.append(value if ok else None)
            try:
                reduced = e.reward.reduce(values, completions, columns)  # type: ignore[union-attr]
                scores[e.name] = _floats(reduced, len(completions))
            except CAUGHT:
                self._errors.report(e.name, traceback.format_exc())
                scores[e.name] = [None] * len(completions)
                failed[e.name] = [True] * n

        per_fn = {e.name: scores[e.name] for e in self.entries}
        self._stop_if_failing(failed, n)
        return self._combine(per_fn, failed, timed_out, n)

    def _stop_if_failing(self, failed: Dict[str, List[bool]], n: int) -> None:
        """A function that failed on every sample of ``max_failed_steps`` calls in a row is broken, not unlucky:
        training on its silence would be training on zero reward."""
        for name, flags in failed.items():
            self._failed_in_a_row[name] = self._failed_in_a_row[name] + 1 if n and all(flags) else 0
            if 0 < self.max_failed_calls <= self._failed_in_a_row[name]:
                raise RewardFailedError(
                    f"reward {name!r} failed on every sample of {self._failed_in_a_row[name]} batches in a row "
                    f"(reward.max_failed_steps={self.max_failed_calls}); its first error: "
                    f"{self._errors.first.get(name, '?')}")

    def missing_columns(self, columns: Iterable[str]) -> List[tuple]:
        """``[(reward name, columns it needs, one of which is absent)]`` for the given dataset columns."""
        present = set(columns)
        return [(e.name, group) for e in self.entries for group in required_columns(e.reward)
                if not present.intersection(group)]

    def check_columns(self, columns: Iterable[str], where: str, allow_missing: Optional[bool] = None) -> None:
        """Stop at data loading when a reward needs a column the data lacks (it would score None on every sample
        and train on nothing): the error names the column(s), the reward and the data file(s). With
        ``allow_missing`` (``reward.allow_missing_columns=true``) it is a warning instead."""
        missing = self.missing_columns(columns)
        if not missing:
            return
        parts = [f"reward {name!r} needs the column {' or '.join(repr(c) for c in group)}" for name, group in missing]
        message = (f"{'; '.join(parts)}, but {where} has no such column (columns: {sorted(set(columns))}). Add the "
                   "column to the data, remove the reward, or set reward.allow_missing_columns=true to train with "
                   "that reward scoring None.")
        if not (self.allow_missing_columns if allow_missing is None else allow_missing):
            raise MissingColumnError(message)
        logger.warning("%s (allowed by reward.allow_missing_columns)", message)

    def _run_pool(self, entries: List[_Entry], completions: List[str], rows: List[Dict[str, Any]]
                  ) -> Dict[str, List[Outcome]]:
        def ship(reward: Any, row: Dict[str, Any]) -> Dict[str, Any]:
            reads = getattr(reward, "reads", None)
            # ship only what the reward reads; if none of it is there, the whole row, so the error names what was
            return ({k: row[k] for k in reads if k in row} or row) if reads is not None else row

        tasks = [(f"{k}:{e.name}", e.reward.spec, c, ship(e.reward, r)) for k, e in enumerate(entries)
                 for c, r in zip(completions, rows)]
        results = self.pool.run(tasks, self.timeout_s)
        n = len(completions)
        return {e.name: results[k * n:(k + 1) * n] for k, e in enumerate(entries)}

    def _batch_deadline(self, e: _Entry, n: int) -> float:
        """A user's plain function gets ``timeout_s`` per call (a function that sleeps stops the step for
        ``timeout_s``, not 30 s); a built-in batch reward (the reward model scores in batches) ``timeout_s`` per
        sample."""
        return self.timeout_s if isinstance(e.reward, FunctionReward) else self.timeout_s * max(1, n)

    def _run_batch(self, e: _Entry, completions: List[str], columns: Dict[str, List[Any]],
                   rows: List[Dict[str, Any]], failed: List[bool], timed_out: List[bool]) -> List[Optional[float]]:
        n = len(completions)
        [(ok, value)] = run_bounded(lambda _: _floats(e.reward(completions, **columns), n), 1,
                                    self._batch_deadline(e, n), name=e.name)
        if ok:
            return value
        self._errors.report(e.name, value)
        if is_timeout(value):  # retrying one sample at a time would cost n more time limits
            failed[:] = [True] * n
            timed_out[:] = [True] * n
            return [None] * n
        outcomes = run_bounded(lambda i: _floats(e.reward([completions[i]], **{k: [v] for k, v in rows[i].items()}),
                                                 1)[0], n, self._batch_deadline(e, 1), name=e.name)
        values: List[Optional[float]] = []
        for i, (ok, value) in enumerate(outcomes):
            if not ok:
                self._errors.report(e.name, value)
                failed[i], timed_out[i] = True, is_timeout(value)
            values.append(value if ok else None)
        return values

    def _combine(self, per_fn: Dict[str, List[Optional[float]]], failed: Dict[str, List[bool]],
                 timed_out: Dict[str, List[bool]], n: int) -> RewardResult:
        weights = {e.name: e.weight for e in self.entries}
        total: List[float] = []
        unscored = 0
        for i in range(n):
            parts = [weights[name] * values[i] for name, values in per_fn.items() if values[i] is not None]
            if not parts and per_fn:
                unscored += 1
            total.append(float(sum(parts)))
        if unscored:
            logger.warning("%d of %d samples were scored by no reward function (all None); their total is 0.0",
                           unscored, n)
        metrics: Dict[str, float] = {}
        for name, values in per_fn.items():
            scored = [v for v in values if v is not None]
            for stat, value in _stats(scored).items():
                metrics[f"reward/{name}/{stat}"] = value
            metrics[f"reward/{name}/none"] = float(n - len(scored))
            metrics[f"rewards/{name}/errors"] = float(sum(failed[name]))
            metrics[f"rewards/{name}/timeouts"] = float(sum(timed_out[name]))
        total_stats = _stats(total)
        metrics["reward/total/mean"] = total_stats["mean"]
        metrics["reward/total/std"] = total_stats["std"]
        metrics["reward/total/unscored"] = float(unscored)
        return RewardResult(total=total, per_fn=per_fn, metrics=metrics, failed=failed, timed_out=timed_out)


class MissingColumnError(ValueError):
    pass


# the registry's rewards that score nothing without these columns (the table in stagewise/rewards/__init__.py)
BUILTIN_NEEDS: Dict[str, tuple] = {
    "accuracy": (GOLD_COLUMNS,), "boxed_math": (GOLD_COLUMNS,), "answer_tag": (GOLD_COLUMNS,),
    "cosine": (GOLD_COLUMNS,), "length": (GOLD_COLUMNS,), "countdown": (("nums",), ("target",)),
}


def data_files(data_cfg: Any) -> str:
    """``data.sources`` as the error names them: "the data file(s) a.jsonl, b.parquet"."""
    paths = [str(s.path) for s in data_cfg.sources]
    return f"the data file{'s' if len(paths) > 1 else ''} {', '.join(paths)}" if paths else "the data"


def required_columns(reward: Any) -> List[tuple]:
    """Column groups a reward cannot score without: each group is any-of (``("answer", "solution")``). A reward
    declares them with ``needs = (("nums",), ("target",))``; a reward that reads only the gold columns
    (``reads = GOLD_COLUMNS``) needs one of them."""
    needs = getattr(reward, "needs", None)
    if needs is not None:
        return [tuple(g) if not isinstance(g, str) else (g,) for g in needs]
    spec = getattr(reward, "spec", None)
    if spec is not None and spec[0] in BUILTIN_NEEDS:
        return list(BUILTIN_NEEDS[spec[0]])
    reads = getattr(reward, "reads", None)
    if reads is not None and set(reads) <= set(GOLD_COLUMNS):
        return [tuple(reads)]
    return []


def _floats(values: Any, n: int) -> List[Optional[float]]:
    values = list(values)
    if len(values) != n:
        raise ValueError(f"reward returned {len(values)} values for {n} completions")
    return [None if v is None or v != v else float(v) for v in values]
