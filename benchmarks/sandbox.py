"""Sandbox latency: a pandas read-and-aggregate block, our Sandbox vs a fresh `python` per block.

    python benchmarks/sandbox.py                      # 40 blocks each, 20,000-row CSV, isolation auto
    python benchmarks/sandbox.py --n 100 --rows 200000 --isolation namespaces

Baseline: `python -c CODE` in a fresh subprocess with the workspace as cwd, once per block, as DeepAnalyze's
execution servers do: every block pays the interpreter start and the pandas/numpy/matplotlib imports
(DeepAnalyze's training env forks a multiprocessing child instead, from a process that has not imported pandas
either). Ours: `Sandbox.run` on a warm Sandbox (stateless: a fresh process per block, forked from a zygote that
already imported the stack; and stateful). All runs are sequential, on one Sandbox, and every output is checked
against the first one. Blocks are `--gap` seconds apart (not timed), as turns are in the agent loop, where
the stateless Sandbox forks the next block's process while the model generates. Also reported: an empty block
(`pass`: the sandbox's own cost per agent-loop turn) and Sandbox enter+exit per trajectory, warm (a spare zygote
is ready, as in training) and cold (none is).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stagewise.envs.sandbox import Sandbox, prewarm, resolve_isolation

CODE = "import pandas as pd\nprint(pd.read_csv('data.csv').groupby('k')['v'].sum())"


def make_workspace(root: Path, rows: int) -> Path:
    ws = root / "workspace"
    ws.mkdir()
    lines = ["k,v"] + [f"g{i % 10},{(i * 7919) % 1000}" for i in range(rows)]
    (ws / "data.csv").write_text("\n".join(lines) + "\n")
    return ws


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def timed(fn, n: int, gap: float) -> tuple[list[float], set[str]]:
    lat, outputs = [], set()
    for _ in range(n):
        time.sleep(gap)  # the model generating the next turn; not timed
        t = time.perf_counter()
        outputs.add(fn())
        lat.append(time.perf_counter() - t)
    return lat, outputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40, help="blocks per method")
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--isolation", default="auto")
    ap.add_argument("--trajectories", type=int, default=10, help="enter/exit cycles measured, warm and cold")
    ap.add_argument("--gap", type=float, default=0.05,
                    help="seconds between blocks (generation time in the agent loop), not timed; 0 = back to back")
    args = ap.parse_args()
    mode = resolve_isolation(args.isolation)

    with tempfile.TemporaryDirectory() as tmp:
        ws = make_workspace(Path(tmp), args.rows)

        def fresh_python() -> str:
            p = subprocess.run([sys.executable, "-c", CODE], cwd=ws, capture_output=True, text=True, timeout=120)
            return p.stdout + p.stderr

        results = {"fresh `python` per block (DeepAnalyze)": timed(fresh_python, args.n, args.gap)}
        prewarm(1, mode, wait=True)
        for stateful in (False, True):
            with Sandbox(ws, isolation=mode, stateful=stateful) as sb:
                sb.run(CODE)  # the first block of a trajectory is measured like any other in `timed`
                label = f"Sandbox {'stateful' if stateful else 'stateless'} ({mode})"
                results[label] = timed(lambda: sb.run(CODE).output, args.n, args.gap)
                if not stateful:
                    empty = timed(lambda: sb.run("pass").output, args.n, args.gap)

        outputs = {o for _, outs in results.values() for o in outs}
        assert len(outputs) == 1 and "g0" in next(iter(outputs)), f"outputs differ: {outputs}"

        enter_warm, exit_warm, enter_cold, exit_cold = [], [], [], []
        for cold in (False, True):
            for _ in range(args.trajectories):
                prewarm(0 if cold else 1, mode, wait=True)
                t0 = time.perf_counter()
                with Sandbox(ws, isolation=mode) as sb:
                    t1 = time.perf_counter()
                t2 = time.perf_counter()
                (enter_cold if cold else enter_warm).append(t1 - t0)
                (exit_cold if cold else exit_warm).append(t2 - t1)
        prewarm(1, mode)

    base = statistics.median(results["fresh `python` per block (DeepAnalyze)"][0])
    print(f"\n{args.n} blocks per method, {args.rows:,}-row CSV, isolation={mode}, {args.gap}s between blocks\n")
    print(f"{'method':48s} {'p50 ms':>9s} {'p95 ms':>9s} {'exec/s':>8s} {'p50 speedup':>12s}")
    for label, (lat, _) in results.items():
        p50 = statistics.median(lat)
        print(f"{label:48s} {p50 * 1e3:9.1f} {pct(lat, 0.95) * 1e3:9.1f} {len(lat) / sum(lat):8.1f} "
              f"{base / p50:11.1f}x")
    print(f"{'empty block `pass` (per-turn sandbox overhead)':48s} {statistics.median(empty[0]) * 1e3:9.1f} "
          f"{pct(empty[0], 0.95) * 1e3:9.1f} {len(empty[0]) / sum(empty[0]):8.1f}")
    print(f"\nSandbox enter/exit per trajectory ({args.trajectories} each; p50 / p95 ms):")
    for label, enter, ex in (("warm (spare zygote ready)", enter_warm, exit_warm),
                             ("cold (no spare: start + imports)", enter_cold, exit_cold)):
        print(f"  {label:34s} enter {statistics.median(enter) * 1e3:7.1f} / {pct(enter, 0.95) * 1e3:7.1f}"
              f"   exit {statistics.median(ex) * 1e3:7.1f} / {pct(ex, 0.95) * 1e3:7.1f}")


if __name__ == "__main__":
    main()
