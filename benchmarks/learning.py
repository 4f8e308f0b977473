"""Does RL help, on this machine, at every seed? Runs a pipeline over seeds and thread counts and prints one table.

    python benchmarks/learning.py                              # the default run (pipeline=tiny), seeds 0 1 2, 2 threads
    python benchmarks/learning.py --seeds 0 1 2 --threads 1 2  # both reduction orders (stand-in for another CPU)
    python benchmarks/learning.py --threads 1 --jobs 2         # two 1-thread runs at a time on a 2-core machine
    python benchmarks/learning.py --pipeline r1_zero_tiny --metric eval/accuracy
    python benchmarks/learning.py -- stage.max_steps=10        # extra overrides after `--` go to every run
    python benchmarks/learning.py --rollout vllm               # generate with the colocated vLLM engine
    python benchmarks/learning.py --max-staleness 1            # + the RL stage again, asynchronous (k=1)

Each run is a real ``python train.py pipeline=<name> seed=<s>`` in its own process with ``OMP_NUM_THREADS`` set, in
``--workdir`` (a temporary folder unless given; kept, so every run folder can be opened afterwards). The table reads
each stage's ``metrics.jsonl``: a stage's first held-out eval is its start, its last is its end. Columns: the
metric at the start of the first stage, after each stage, the RL margin (end - start of the last stage), the mean
held-out completion length and format compliance at the start and end of the last stage, and the run's wall time.
Then the margin's mean and sample standard deviation over all runs. Exit status 1 if a run failed.

``--max-staleness k [k ...]``: after each pipeline run, its last (RL) stage runs again from the previous stage's
``final/`` with ``stage.max_staleness=k`` (asynchronous GRPO, same seed and engine; ``algorithm.tis_cap=2.0``
where the stage has none, as asynchronous GRPO needs one), and a second table puts each
k's margin and RL-stage wall time beside the synchronous stage of the same run (its ``pipeline_state.json``
seconds), with the speed-up.

With ``--jobs 2`` runs share the machine, so their wall times are not comparable with ``--jobs 1`` ones; the
numbers themselves do not depend on it (every run is single-process and seeded; ``OMP_NUM_THREADS`` fixes the
reduction order).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LENGTH = "eval/completions/mean_length"
FORMAT = "eval/quality/format_compliance"


@dataclass
class StageCurve:
    """A stage's first and last held-out evaluation (``None`` where it logged none)."""
    name: str
    start: dict = field(default_factory=dict)
    end: dict = field(default_factory=dict)


@dataclass
class RunResult:
    seed: int
    threads: int
    seconds: float
    returncode: int
    folder: str
    stages: list[StageCurve] = field(default_factory=list)
    error: str = ""


def stage_curve(stage_dir: Path) -> StageCurve:
    """First and last row of ``metrics.jsonl`` holding an eval metric; a resumed run's repeated steps count once."""
    rows = {}
    path = stage_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        record = json.loads(line) if line.strip() else {}
        if any(k.startswith("eval/") for k in record):
            rows[record.get("step", 0)] = {**rows.get(record.get("step", 0), {}), **record}
    name = stage_dir.name.split("_", 1)[-1]
    if not rows:
        return StageCurve(name)
    steps = sorted(rows)
    return StageCurve(name, rows[steps[0]], rows[steps[-1]])


def run_one(pipeline: str, seed: int, threads: int, workdir: Path, extra: list[str]) -> RunResult:
    run_id = f"learning_{pipeline}_s{seed}_t{threads}"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.pop("STAGEWISE_RUN_ID", None)
    cmd = [sys.executable, str(ROOT / "train.py"), f"pipeline={pipeline}", f"seed={seed}", f"run_id={run_id}",
           f"paths.output_dir={workdir}", "resume=never", *extra]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - start
    folders = sorted(workdir.glob(f"*/{run_id}"))
    folder = folders[-1] if folders else workdir
    (workdir / f"{run_id}.log").write_text(proc.stdout + proc.stderr)
    stages = [stage_curve(d) for d in sorted(folder.iterdir()) if d.is_dir() and d.name[:2].isdigit()] \
        if folders else []
    return RunResult(seed, threads, seconds, proc.returncode, str(folder), stages,
                     "" if proc.returncode == 0 else proc.stderr.strip().splitlines()[-1:][0] if proc.stderr else "")


def rl_stage_again(pipeline: str, result: RunResult, k: int, workdir: Path, extra: list[str]) -> RunResult:
    """The pipeline run's last stage again, from the previous stage's final/, with ``stage.max_staleness=k``."""
    sys.path.insert(0, str(ROOT / "src"))
    from stagewise.hydra_config import compose

    stages = compose([f"pipeline={pipeline}"]).pipeline.stages
    overrides = list(stages[-1].overrides)
    if compose(overrides).algorithm.tis_cap is None:  # asynchronous GRPO corrects with capped weights: the default cap
        overrides.append("algorithm.tis_cap=2.0")
    state = json.loads((Path(result.folder) / "pipeline_state.json").read_text())
    previous_final = state["finished"][-2]["outputs"]["final"]
    run_id = f"learning_{pipeline}_s{result.seed}_t{result.threads}_k{k}"
    env = {**os.environ, "OMP_NUM_THREADS": str(result.threads), "MKL_NUM_THREADS": str(result.threads)}
    env.pop("STAGEWISE_RUN_ID", None)
    cmd = [sys.executable, str(ROOT / "train.py"), *overrides, f"model.name_or_path={previous_final}",
           f"stage.max_staleness={k}", f"seed={result.seed}", f"run_id={run_id}", f"paths.output_dir={workdir}",
           "resume=never", *extra]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - start
    (workdir / f"{run_id}.log").write_text(proc.stdout + proc.stderr)
    folders = sorted(workdir.glob(f"*/{run_id}"))
    return RunResult(result.seed, result.threads, seconds, proc.returncode, str(folders[-1]) if folders else "",
                     [stage_curve(folders[-1])] if folders else [],
                     "" if proc.returncode == 0 else (proc.stderr.strip().splitlines() or [""])[-1])


def staleness_table(pairs: list[tuple[RunResult, int, RunResult]], metric: str) -> str:
    """Each k's RL stage beside the synchronous one of the same pipeline run."""
    head = ["seed", "threads", "sync margin (pts)", "sync RL s", "k", "async margin (pts)", "async RL s", "speed-up"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for sync, k, again in pairs:
        state = json.loads((Path(sync.folder) / "pipeline_state.json").read_text())
        sync_s = state["finished"][-1]["seconds"]
        m0, m1 = margin(sync, metric), margin(again, metric)
        fmt = lambda m: "-" if m is None else f"{100 * m:+.1f}"  # noqa: E731
        ok = again.returncode == 0
        lines.append(f"| {sync.seed} | {sync.threads} | {fmt(m0)} | {sync_s:.0f} | {k} | "
                     f"{fmt(m1) if ok else f'failed: {again.error}'} | {again.seconds:.0f} | "
                     f"{sync_s / again.seconds:.2f}x |")
    return "\n".join(lines)


def margin(result: RunResult, metric: str) -> float | None:
    last = result.stages[-1] if result.stages else None
    if last is None or metric not in last.start or metric not in last.end:
        return None
    return last.end[metric] - last.start[metric]


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def num(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def table(results: list[RunResult], metric: str) -> str:
    names = [s.name for s in results[0].stages] if results and results[0].stages else []
    head = ["seed", "threads", "start %"] + [f"after {n} %" for n in names] + [
        "margin (pts)", "length before", "length after", "format before %", "format after %", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if r.returncode != 0 or not r.stages:
            lines.append(f"| {r.seed} | {r.threads} | failed (exit {r.returncode}): {r.error} |")
            continue
        first, last = r.stages[0], r.stages[-1]
        m = margin(r, metric)
        cells = [str(r.seed), str(r.threads), pct(first.start.get(metric))]
        cells += [pct(s.end.get(metric)) for s in r.stages]
        cells += ["-" if m is None else f"{100 * m:+.1f}", num(last.start.get(LENGTH)), num(last.end.get(LENGTH)),
                  pct(last.start.get(FORMAT)), pct(last.end.get(FORMAT)), f"{r.seconds:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    margins = [m for m in (margin(r, metric) for r in results) if m is not None]
    if margins:
        spread = statistics.stdev(margins) if len(margins) > 1 else 0.0
        lines.append(f"\nRL margin on {metric} over {len(margins)} run(s): mean {100 * statistics.mean(margins):+.1f} "
                     f"points, std {100 * spread:.1f}, min {100 * min(margins):+.1f}, max {100 * max(margins):+.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pipeline", default="tiny")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[2], help="OMP_NUM_THREADS values, each a run")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--metric", default="eval/accuracy")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--max-staleness", type=int, nargs="*", default=[],
                        help="rerun each pipeline's RL stage asynchronously with these stage.max_staleness values")
    parser.add_argument("--rollout", default="hf", choices=["hf", "vllm"],
                        help="generation engine of every stage (vllm: the colocated engine; vLLM's CPU build on CPU)")
    args = parser.parse_args(argv)
    if args.rollout != "hf":
        extra = [f"rollout={args.rollout}", *extra]

    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="stagewise_learning_"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    grid = [(s, t) for t in args.threads for s in args.seeds]
    print(f"{len(grid)} run(s) of pipeline={args.pipeline} in {workdir} ({args.jobs} at a time)", flush=True)

    def one(point: tuple[int, int]) -> RunResult:
        result = run_one(args.pipeline, point[0], point[1], workdir, extra)
        m = margin(result, args.metric)
        print(f"  seed {point[0]} threads {point[1]}: exit {result.returncode}, {result.seconds:.0f} s, margin "
              f"{'-' if m is None else f'{100 * m:+.1f}'} points ({result.folder})", flush=True)
        return result

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(one, grid))
    print(f"\npipeline={args.pipeline} {' '.join(extra)}".rstrip() + f", metric {args.metric}, held-out greedy\n")
    print(table(results, args.metric))
    pairs = []
    for result in results:
        for k in args.max_staleness if result.returncode == 0 else []:
            again = rl_stage_again(args.pipeline, result, k, workdir, extra)
            print(f"  seed {result.seed} threads {result.threads} k={k}: exit {again.returncode}, "
                  f"{again.seconds:.0f} s", flush=True)
            pairs.append((result, k, again))
    if pairs:
        print(f"\nRL stage, synchronous vs stage.max_staleness=k (same seed, threads and engine), metric {args.metric}\n")
        print(staleness_table(pairs, args.metric))
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ | {"stages": [s.__dict__ for s in r.stages]} for r in results],
                                        indent=2, default=str))
    return 0 if all(r.returncode == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
