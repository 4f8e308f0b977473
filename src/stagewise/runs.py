"""Read run folders into pandas: one run, a sweep, a pipeline, or a whole ``outputs/`` tree.

    from stagewise import runs
    run = runs.load_run("outputs/train/2026-01-01_12-00-00_ab12")   # Run: config, metrics, samples
    run.metrics[["step", "loss"]]
    table = runs.load_sweep("outputs/train/multirun_<id>")           # one row per run: swept keys + final metrics
    runs.load_metrics("outputs/train/multirun_<id>")                 # every run's metrics, with a `run` column

What is read (the run-folder layout of stagewise.run_folder and the README), and nothing else (never the training
code's internals):
  * ``.hydra/config.yaml`` -> config, flattened to dotted keys (``stage.learning_rate``). Hydra saves it
    unresolved; plain ``${a.b}`` references are resolved here, resolver calls (``${oc.env:..}``,
    ``${stagewise_run_id:}``) are kept as written, since calling them here would give this process's value.
  * ``.hydra/overrides.yaml`` -> the command-line overrides (a sweep's swept keys come from there).
  * ``metrics.jsonl`` -> one row per record; the strings "nan"/"inf" it uses for non-finite values become floats.
  * ``samples/step_<N>.parquet`` -> rollouts, with a ``step`` column taken from the file name when absent.
  * a pipeline (``pipeline_state.json`` or ``NN_<name>/`` stage folders) -> its stages' metrics and samples in
    order, with a ``pipeline_stage`` column (``01_sft``) and ``stage_index``.
A run folder is one with ``.hydra/config.yaml`` or ``metrics.jsonl``; a sweep folder holds numbered run folders
(and Hydra's ``multirun.yaml``).

Metric names the helpers look for (``metric_families``, ``seed004_report``) are listed in ``FAMILIES`` and
``REPORT_COLUMNS``: the first name present is used, so a loop that logs any of them is understood.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

import pandas as pd

from stagewise.run_folder import RunFolder

from stagewise.tracking.alerts import ENTROPY_KEYS, KL_KEYS, REWARD_MEAN_RE, as_float

STAGE_DIR_RE = re.compile(r"^(?P<index>\d{2})_(?P<name>.+)$")
SAMPLE_FILE_RE = re.compile(r"^step_(?P<step>\d+)\.parquet$")
_SKIP_DIRS = {"checkpoints", "final", "samples", "tensorboard", "wandb", "__pycache__"}
_NODE_REF = re.compile(r"\$\{([A-Za-z_][\w.]*)\}")

# Curves the notebook draws: family -> regexes over metric names (matched in order).
FAMILIES: Dict[str, Sequence[str]] = {
    "loss": (r"^loss$", r"^loss_avg$", r"^policy_loss$", r"^loss/.+", r"^eval/loss$"),
    "reward": (REWARD_MEAN_RE.pattern, r"^eval/reward/[^/]+/mean$"),
    "length": (r"^completions/mean_length$", r"^completion_length/mean$", r"^response_length/mean$",
               r"^length/mean$", r"^eval/completions/mean_length$"),
    "kl": tuple(rf"^{re.escape(k)}$" for k in KL_KEYS),
    "entropy": tuple(rf"^{re.escape(k)}$" for k in ENTROPY_KEYS),
}

# Seed 004's console block as a table: column -> candidate metric names (first present wins).
REPORT_COLUMNS: Dict[str, Sequence[str]] = {
    "Loss": ("loss",),
    "LR": ("lr", "learning_rate"),
    "Epoch": ("epoch",),
    "Policy": ("policy_loss", "loss/policy"),
    "KL": KL_KEYS,
    "Entropy": ENTROPY_KEYS,
    "Format %": ("quality/format_compliance", "format_compliance"),
    "Avg length": ("completions/mean_length", "completion_length/mean", "response_length/mean"),
    "Avg chars": ("completions/mean_chars",),
    "Reasoning/resp": ("quality/reasoning_indicators", "reasoning_indicators"),
    "Step time (s)": ("time/step", "step_time"),
    "Samples/s": ("perf/samples_per_s", "samples_per_s"),
    "Memory (GB)": ("memory/gpu_max_allocated_gb", "memory/max_rss_gb", "memory_gb"),
}


# ----------------------------------------------------------------------------------------------- discovery
def is_run_dir(path: Path) -> bool:
    path = Path(path)
    return (path / ".hydra" / "config.yaml").exists() or (path / "metrics.jsonl").exists()


def pipeline_stages(path: Path) -> List[Path]:
    """The ``NN_<name>`` stage folders of a pipeline run, in order (empty for a plain run)."""
    path = Path(path)
    if not path.is_dir():
        return []
    stages = [p for p in path.iterdir() if p.is_dir() and STAGE_DIR_RE.match(p.name) and is_run_dir(p)]
    return sorted(stages, key=lambda p: p.name)


def _natural(p: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def find_runs(root: str | Path) -> List[Path]:
    """Run folders at or under ``root`` (a pipeline counts as one run), in a stable natural order."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist")
    if is_run_dir(root) or pipeline_stages(root):
        return [root]
    found: List[Path] = []
    for child in sorted((p for p in root.iterdir() if p.is_dir()), key=_natural):
        if child.name.startswith(".") or child.name in _SKIP_DIRS:
            continue
        found.extend(find_runs(child))
    return found


def launch_dir() -> Path:
    """Where the user started ``jupyter`` (the shell's ``$PWD``): a notebook's kernel itself runs in the notebook's
    folder, so a relative path the user typed must not be resolved against the kernel's working directory."""
    pwd = os.environ.get("PWD")
    return Path(pwd) if pwd and Path(pwd).is_dir() else Path.cwd()


def locate_run(value: str = "", base: str | Path | None = None) -> Path:
    """The run a notebook shows: ``value`` (``$STAGEWISE_RUN_DIR``; a relative path is taken from ``base``, by
    default `launch_dir`), or, when empty, the newest run under ``outputs/`` of ``base``, of the working directory
    or of its parent (the repository, for a kernel in ``notebooks/``)."""
    base = Path(base) if base is not None else launch_dir()
    if value:
        path = Path(value).expanduser()
        path = path if path.is_absolute() else base / path
        if not path.exists():
            raise FileNotFoundError(f"STAGEWISE_RUN_DIR={value}: {path} does not exist")
        return path
    places = list(dict.fromkeys(p / "outputs" for p in (base, Path.cwd(), Path.cwd().parent)))
    found = [run for place in places if place.is_dir() for run in find_runs(place)]
    if not found:
        raise FileNotFoundError(f"no runs under {', '.join(map(str, places))}: set STAGEWISE_RUN_DIR to a run folder")
    return max(found, key=lambda p: p.stat().st_mtime)


def is_sweep_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / "multirun.yaml").exists() or (not is_run_dir(path) and len(find_runs(path)) > 1)


# ------------------------------------------------------------------------------------------------- config
def flatten(tree: Any, prefix: str = "") -> Dict[str, Any]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` -> ``{"a.b": 1, "c": [1, 2]}`` (lists stay values)."""
    if isinstance(tree, dict):
        out: Dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def _resolve_refs(flat: Dict[str, Any]) -> Dict[str, Any]:
    """Resolve plain ``${a.b}`` references between flat keys (a few passes for chains); leave the rest."""
    out = dict(flat)
    for _ in range(5):
        changed = False
        for k, v in out.items():
            if not isinstance(v, str) or "${" not in v:
                continue
            whole = _NODE_REF.fullmatch(v)
            if whole and whole[1] in out and not (isinstance(out[whole[1]], str) and "${" in out[whole[1]]):
                out[k], changed = out[whole[1]], True
                continue

            def sub(m):
                ref = out.get(m[1])
                return str(ref) if m[1] in out and not (isinstance(ref, str) and "${" in ref) else m[0]

            new = _NODE_REF.sub(sub, v)
            if new != v:
                out[k], changed = new, True
        if not changed:
            break
    return out


def load_config(run_dir: str | Path) -> Dict[str, Any]:
    """The run's config as ``{dotted key: value}`` ({} when the folder has no ``.hydra/config.yaml``)."""
    from omegaconf import OmegaConf

    path = Path(run_dir) / ".hydra" / "config.yaml"
    if not path.exists():
        return {}
    try:
        tree = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as e:  # a half-written or hand-edited file: name it
        raise ValueError(f"cannot read {path}: {e}") from e
    return _resolve_refs(flatten(tree))


def load_overrides(run_dir: str | Path) -> List[str]:
    from omegaconf import OmegaConf

    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    return list(OmegaConf.to_container(OmegaConf.load(path))) if path.exists() else []


# ------------------------------------------------------------------------------------------------ metrics
def read_jsonl(path: str | Path) -> pd.DataFrame:
    """metrics.jsonl as a DataFrame. A torn last line (the job was killed mid-write) is skipped; a bad line
    elsewhere is an error naming the file and line."""
    path = Path(path)
    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                continue
            raise ValueError(f"{path}:{i + 1} is not valid JSON ({e})") from None
    df = pd.DataFrame(rows)
    for col in df.columns:
        if df[col].dtype != object:
            continue
        values = [v for v in df[col] if v is not None and not (isinstance(v, float) and math.isnan(v))]
        if values and all(as_float(v) is not None for v in values):  # numbers mixed with "nan"/"inf" strings
            df[col] = [as_float(v) if v is not None else math.nan for v in df[col]]
    return df


def _single_metrics(run_dir: Path) -> pd.DataFrame:
    stages = pipeline_stages(run_dir)
    if stages:
        parts = []
        for p in stages:
            df = _single_metrics(p)
            m = STAGE_DIR_RE.match(p.name)
            df.insert(0, "pipeline_stage", p.name)
            df.insert(1, "stage_index", int(m["index"]))
            parts.append(df)
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    path = run_dir / "metrics.jsonl"
    return drop_replayed(read_jsonl(path)) if path.exists() else pd.DataFrame()


def drop_replayed(metrics: pd.DataFrame) -> pd.DataFrame:
    """Each step once, as the resumed run logged it. A job killed after its last checkpoint replays the steps since
    that checkpoint when it resumes; a file written before the loop truncated on resume (or by another writer) then
    holds those steps twice. Per ``stage``: a record whose step goes back below a step already seen starts a new
    attempt, and the earlier records after that step are dropped; of records with the same stage, step and set of
    logged keys, the last is kept (a data report or step-0 eval logged again by a restart)."""
    if metrics.empty or "step" not in metrics.columns:
        return metrics
    stages = metrics["stage"].tolist() if "stage" in metrics.columns else [None] * len(metrics)
    steps = pd.to_numeric(metrics["step"], errors="coerce").tolist()
    ignore = {"step", "stage", "time"}
    logged = metrics.notna().to_numpy() & [c not in ignore for c in metrics.columns]
    kinds = [row.tobytes() for row in logged]
    kept: List[int] = []
    seen_max: Dict[Any, float] = {}
    for i, (stage, step) in enumerate(zip(stages, steps)):
        if step != step:  # no step: keep as is
            kept.append(i)
            continue
        if step < seen_max.get(stage, -math.inf):  # a restart from an earlier checkpoint
            kept = [k for k in kept if not (stages[k] == stage and steps[k] > step)]
            seen_max[stage] = step
        seen_max[stage] = max(seen_max.get(stage, -math.inf), step)
        kept.append(i)
    last: Dict[Any, int] = {}
    for k in kept:
        last[(stages[k], steps[k], kinds[k])] = k
    keep = sorted(last.values())
    if len(keep) == len(metrics):
        return metrics
    return metrics.iloc[keep].reset_index(drop=True)


def run_name(run_dir: Path, root: Path) -> str:
    rel = run_dir.relative_to(root) if run_dir != root else Path(run_dir.name)
    return str(rel)


def load_metrics(path: str | Path) -> pd.DataFrame:
    """Metrics of every run at or under ``path``, with a ``run`` column (the folder relative to ``path``)."""
    root = Path(path)
    parts = []
    for r in find_runs(root):
        df = _single_metrics(r)
        df.insert(0, "run", run_name(r, root))
        parts.append(df)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["run"])


# ------------------------------------------------------------------------------------------------ samples
def _sample_files(run_dir: Path) -> List[Path]:
    folders = [run_dir] + pipeline_stages(run_dir)
    files = [f for d in folders if (d / "samples").is_dir() for f in (d / "samples").glob("step_*.parquet")]
    return sorted(files, key=lambda f: (f.parent.parent.name if f.parent.parent != run_dir else "",
                                        int(SAMPLE_FILE_RE.match(f.name)["step"])))


def load_samples(path: str | Path, steps: Optional[Iterable[int]] = None) -> pd.DataFrame:
    """Rollouts of every run at or under ``path`` (``samples/step_<N>.parquet``), with ``run`` and ``step``."""
    root = Path(path)
    wanted = set(steps) if steps is not None else None
    parts = []
    for r in find_runs(root):
        for f in _sample_files(r):
            step = int(SAMPLE_FILE_RE.match(f.name)["step"])
            if wanted is not None and step not in wanted:
                continue
            try:
                df = pd.read_parquet(f)
            except Exception as e:
                raise ValueError(f"cannot read samples file {f}: {e}") from e
            if "step" not in df.columns:
                df.insert(0, "step", step)
            if f.parent.parent != r:
                df.insert(0, "pipeline_stage", f.parent.parent.name)
            df.insert(0, "run", run_name(r, root))
            parts.append(df)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["run", "step"])


# ---------------------------------------------------------------------------------------------------- runs
def is_complete(run_dir: str | Path) -> bool:
    """A run finished when it wrote ``final/`` (vocab, sft, grpo) or ``result.json`` (the other stages); a
    pipeline when every stage in its ``pipeline_state.json`` did."""
    run_dir = Path(run_dir)
    state = run_dir / "pipeline_state.json"
    if state.exists() or pipeline_stages(run_dir):
        summary = run_dir / "pipeline_summary.json"
        return summary.exists()
    return RunFolder(run_dir).finished()


@dataclass
class Run:
    path: Path
    name: str
    config: Dict[str, Any]
    overrides: List[str]
    metrics: pd.DataFrame
    complete: bool
    stages: List[str] = field(default_factory=list)

    @cached_property
    def samples(self) -> pd.DataFrame:
        df = load_samples(self.path)
        return df.drop(columns=["run"])

    @property
    def last_step(self) -> Optional[int]:
        return int(self.metrics["step"].max()) if "step" in self.metrics and len(self.metrics) else None


def load_run(path: str | Path, name: Optional[str] = None) -> Run:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"run folder {path} does not exist")
    if not (is_run_dir(path) or pipeline_stages(path)):
        raise ValueError(f"{path} is not a run folder (no .hydra/config.yaml, no metrics.jsonl, no NN_<stage>/ "
                         f"folders); runs under it: {[str(p) for p in find_runs(path)][:5]}")
    return Run(path=path, name=name or path.name, config=load_config(path), overrides=load_overrides(path),
               metrics=_single_metrics(path), complete=is_complete(path),
               stages=[p.name for p in pipeline_stages(path)])


def final_metrics(metrics: pd.DataFrame) -> Dict[str, float]:
    """The last non-missing value of every numeric metric (records only hold what was logged at that step)."""
    out: Dict[str, float] = {}
    for col in metrics.columns:
        if col in ("run", "step", "time", "stage", "pipeline_stage", "stage_index"):
            continue
        series = pd.to_numeric(metrics[col], errors="coerce").dropna()
        if len(series):
            out[col] = float(series.iloc[-1])
    return out


def varying_keys(configs: Sequence[Dict[str, Any]]) -> List[str]:
    """Config keys whose value differs between runs (ignoring the per-run bookkeeping keys)."""
    keys = sorted(set().union(*configs)) if configs else []
    ignore = {"run_id", "run_dir"}
    return [k for k in keys if k not in ignore
            and len({json.dumps(c.get(k), sort_keys=True, default=str) for c in configs}) > 1]


def load_sweep(path: str | Path, config_keys: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """One row per run under ``path``: ``run``, ``complete``, ``last_step``, config columns (the keys that vary
    between the runs, or ``config_keys``), then the final value of every metric."""
    root = Path(path)
    runs = [load_run(r, name=run_name(r, root)) for r in find_runs(root)]
    if not runs:
        raise ValueError(f"no run folders under {root}")
    keys = list(config_keys) if config_keys is not None else varying_keys([r.config for r in runs])
    rows = []
    for r in runs:
        row: Dict[str, Any] = {"run": r.name, "complete": r.complete, "last_step": r.last_step}
        row.update({k: r.config.get(k) for k in keys})
        row.update(final_metrics(r.metrics))
        rows.append(row)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------- notebook helpers
def metric_families(columns: Iterable[str]) -> Dict[str, List[str]]:
    """``{"loss": [...], "reward": [...], "length": [...], "kl": [...], "entropy": [...]}``: the metric columns of
    each curve family, in FAMILIES order; a family with no column maps to []."""
    cols = list(columns)
    out: Dict[str, List[str]] = {}
    for fam, patterns in FAMILIES.items():
        picked: List[str] = []
        for pat in patterns:
            rx = re.compile(pat)
            picked += [c for c in cols if rx.match(c) and c not in picked]
        out[fam] = picked
    return out


def with_global_step(metrics: pd.DataFrame) -> pd.DataFrame:
    """Add ``global_step``: ``step`` for a plain run; for a pipeline, each stage's steps shifted by the last step
    of the stages before it, so a curriculum draws as one curve from left to right."""
    out = metrics.copy()
    if "pipeline_stage" not in out.columns:
        out["global_step"] = out["step"]
        return out
    offset, shifted = 0, []
    for _, group in out.groupby("pipeline_stage", sort=True):
        shifted.append(group["step"] + offset)
        offset += int(group["step"].max()) if len(group) else 0
    out["global_step"] = pd.concat(shifted).reindex(out.index)
    return out


def _first(df: pd.DataFrame, names: Sequence[str]) -> Optional[str]:
    return next((n for n in names if n in df.columns and df[n].notna().any()), None)


def _fmt_reward(mean, std, lo, hi) -> str:
    def f(x):
        return "   n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:6.3f}"

    return f"{f(mean)} ± {f(std).strip()} [{f(lo).strip()}, {f(hi).strip()}]"


def reward_functions(columns: Iterable[str]) -> List[str]:
    """Reward function names with a ``reward/<fn>/mean`` column, ``total`` last."""
    fns = [m["fn"] for c in columns if (m := REWARD_MEAN_RE.match(c))]
    return [f for f in fns if f != "total"] + (["total"] if "total" in fns else [])


def seed004_report(metrics: pd.DataFrame) -> pd.DataFrame:
    """Seed 004's console report, one row per logged step that has rewards: Step | Loss | LR | Epoch | Policy |
    KL | Entropy | one "mean ± std [min, max]" column per reward function | total | Format % | Avg length
    (tokens) | Avg chars | Reasoning/resp | Step time | Samples/s | Memory. Columns whose metrics were never logged
    are left out."""
    fns = reward_functions(metrics.columns)
    if not fns:
        return pd.DataFrame()
    rows = metrics[metrics[[f"reward/{fn}/mean" for fn in fns]].notna().any(axis=1)]
    out = pd.DataFrame({"Step": rows["step"].astype(int).values})
    for col in ("Loss", "LR", "Epoch", "Policy", "KL", "Entropy"):
        src = _first(rows, REPORT_COLUMNS[col])
        if src:
            out[col] = rows[src].values
    for fn in fns:
        stats = [rows[f"reward/{fn}/{s}"].values if f"reward/{fn}/{s}" in rows else [None] * len(rows)
                 for s in ("mean", "std", "min", "max")]
        out[fn] = [_fmt_reward(*vals) for vals in zip(*stats)]
    for col in ("Format %", "Avg length", "Avg chars", "Reasoning/resp", "Step time (s)", "Samples/s",
                "Memory (GB)"):
        src = _first(rows, REPORT_COLUMNS[col])
        if src:
            vals = rows[src].astype(float).values
            if col == "Format %" and pd.Series(vals).dropna().le(1.0).all():
                vals = vals * 100.0  # logged as a fraction
            out[col] = vals
    return out


SCORE_COLUMNS = ("reward_total", "reward", "reward/total", "score", "advantage")


def score_column(samples: pd.DataFrame) -> Optional[str]:
    return next((c for c in SCORE_COLUMNS if c in samples.columns), None)


def reward_columns(samples: pd.DataFrame) -> List[str]:
    """Per-function reward columns of a samples table (``reward_<fn>`` or ``reward/<fn>``), not the total."""
    return [c for c in samples.columns if c.startswith(("reward_", "reward/")) and c not in SCORE_COLUMNS]


def best_and_worst(samples: pd.DataFrame, k: int = 1, by: Optional[str] = None) -> pd.DataFrame:
    """Per (run, step): the ``k`` highest- and ``k`` lowest-scoring samples, with a ``rank`` column
    ("best 1", ..., "worst 1", ...). Ties keep file order. ``by`` defaults to the first of SCORE_COLUMNS present."""
    by = by or score_column(samples)
    if by is None:
        raise KeyError(f"no score column in samples (looked for {list(SCORE_COLUMNS)}); columns: "
                       f"{list(samples.columns)}")
    keys = [c for c in ("run", "pipeline_stage", "step") if c in samples.columns]
    parts = []
    for _, group in samples.groupby(keys, sort=True, dropna=False):
        best = group.sort_values(by, ascending=False, kind="stable").head(k).assign(
            rank=[f"best {i + 1}" for i in range(min(k, len(group)))])
        worst = group.sort_values(by, ascending=True, kind="stable").head(k).assign(
            rank=[f"worst {i + 1}" for i in range(min(k, len(group)))])
        parts += [best, worst]
    return pd.concat(parts, ignore_index=True) if parts else samples.assign(rank=[])


# ------------------------------------------------------------------------------------ agentic trajectories
EXECUTE_SPAN_RE = re.compile(r"<Execute>(?:(?!<Execute>).)*?</Execute>", re.DOTALL)  # innermost: no <Execute> inside
ENV_START, ENV_END = "▶ env ▶ ", " ◀ env ◀"
GOLD_COLUMNS = ("answer", "solution", "target")


def mark_execute_spans(text: str, start: str = ENV_START, end: str = ENV_END) -> str:
    """``text`` with each ``<Execute>…</Execute>`` span (both tags) wrapped in ``start``/``end``: the environment
    inserted it and it carries no loss. Everything else is left as is, so removing the markers gives ``text`` back.
    An ``<Execute>`` with no ``</Execute>`` after it is left unmarked: the env always writes both tags and never
    appends a partial observation, so an unclosed one is policy text (e.g. cut by the length limit)."""
    return EXECUTE_SPAN_RE.sub(lambda m: f"{start}{m[0]}{end}", text)


def shorten(text: str, n: int = 600) -> str:
    """``text`` if at most ``n`` chars, else its first and last ``n // 2`` chars around a ``[… k chars …]`` note."""
    text = str(text)
    if len(text) <= n:
        return text
    half = n // 2
    return f"{text[:half]} [… {len(text) - 2 * half} chars …] {text[len(text) - half:]}"


def _present(row, key: str) -> bool:
    value = row.get(key) if hasattr(row, "get") else None
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def trajectory_view(row, prompt_chars: int = 600) -> str:
    """One sample as text: a header line (step, prompt_index, sample, finish_reason, turns, code_calls, code_errors,
    each ``reward_*``, advantage, gold answer; absent or missing values left out), the prompt shortened to
    ``prompt_chars``, then the completion with its Execute spans marked (`mark_execute_spans`)."""
    def fmt(v):  # counts read back as floats (a column with gaps) print as ints
        return int(v) if isinstance(v, float) and v.is_integer() else v

    parts = [f"{k}={fmt(row[k])}" for k in ("step", "prompt_index", "sample", "finish_reason", "turns", "code_calls",
                                            "code_errors") if _present(row, k)]
    rewards = [k for k in row.keys() if str(k).startswith("reward_") and k != "reward_total"] + ["reward_total"]
    parts += [f"{k}={float(row[k]):.3f}" for k in (*rewards, "advantage") if _present(row, k)]
    gold = next((k for k in GOLD_COLUMNS if _present(row, k)), None)
    if gold:
        parts.append(f"{gold}={shorten(row[gold], 80)!r}")
    lines = ["  ".join(parts)]
    if _present(row, "prompt"):
        lines += ["--- prompt", shorten(row["prompt"], prompt_chars)]
    lines += ["--- completion", mark_execute_spans(str(row.get("completion", "")))]
    return "\n".join(lines)


def pick_trajectory(samples: pd.DataFrame) -> Optional[pd.Series]:
    """A multi-turn sample to read: of the rows with ``code_calls`` > 0, those of the last step (the last pipeline
    stage's, in a pipeline), then the highest-scoring (`score_column`), then the one with most code calls; ties
    keep file order. None when no row ran code (a single-turn run)."""
    if "code_calls" not in samples.columns:
        return None
    rows = samples[(pd.to_numeric(samples["code_calls"], errors="coerce").fillna(0) > 0).to_numpy()]
    if rows.empty:
        return None
    if "pipeline_stage" in rows.columns:
        rows = rows[rows["pipeline_stage"] == rows["pipeline_stage"].max()]
    if "step" in rows.columns:
        rows = rows[rows["step"] == rows["step"].max()]
    score = score_column(rows)
    if score is not None and rows[score].notna().any():
        rows = rows[rows[score] == rows[score].max()]
    return rows.iloc[int(pd.to_numeric(rows["code_calls"]).to_numpy().argmax())]
