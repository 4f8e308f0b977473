"""CPU SFT step time with and without one competing busy process (one busy core must not slow training 2.5x).

    python benchmarks/cpu_contention.py                      # OMP_WAIT_POLICY as train.py sets it (PASSIVE on CPU)
    python benchmarks/cpu_contention.py --policy ACTIVE      # the spinning policy, for comparison
    python benchmarks/cpu_contention.py --steps 20 --repeats 2

Each row is a real ``train.py stage=sft data=tiny_sft`` run (``stage.max_steps`` steps, every step logged); the
number is the median ``tokens_per_s`` of its steps after the first two (start-up and the first optimizer step
excluded). "busy" runs it while ``python -c "while True: pass"`` spins on one core. The script prints the ratio
idle / busy and exits 1 when it is above ``--max-slowdown`` (2.5). Idle and busy runs are interleaved, and the
median over ``--repeats`` is reported, because a shared machine's load drifts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def sft_tokens_per_s(steps: int, policy: str | None, workdir: Path, tag: str) -> float:
    env = {**os.environ, "PROJECT_ROOT": str(workdir), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("STAGEWISE_RUN_ID", None)
    env.pop("OMP_WAIT_POLICY", None)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    cmd = [sys.executable, str(REPO / "train.py"), "stage=sft", "data=tiny_sft", "data.eval_sources=[]",
           f"stage.max_steps={steps}", "stage.logging_steps=1", "stage.save_steps=0", "logger.progress_bar=false",
           f"run_id={tag}"]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (workdir / "outputs" / "train" / tag / "metrics.jsonl").read_text()
            .splitlines()]
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] > 2]
    return statistics.median(speeds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--policy", default=None, help="OMP_WAIT_POLICY to force (default: train.py's choice)")
    ap.add_argument("--max-slowdown", type=float, default=2.5)
    args = ap.parse_args()
    idle, busy = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.repeats):
            idle.append(sft_tokens_per_s(args.steps, args.policy, Path(tmp), f"idle{k}"))
            spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            try:
                busy.append(sft_tokens_per_s(args.steps, args.policy, Path(tmp), f"busy{k}"))
            finally:
                spinner.kill()
                spinner.wait()
    i, b = statistics.median(idle), statistics.median(busy)
    slowdown = i / b if b else float("inf")
    print(f"OMP_WAIT_POLICY={args.policy or os.environ.get('OMP_WAIT_POLICY') or 'train.py default (PASSIVE on CPU)'}"
          f", {os.cpu_count()} CPUs, {args.steps} steps x {args.repeats}")
    print(f"  idle : {i:9.0f} tokens/s   (runs: {', '.join(f'{x:.0f}' for x in idle)})")
    print(f"  busy : {b:9.0f} tokens/s   (runs: {', '.join(f'{x:.0f}' for x in busy)})")
    print(f"  slowdown under one busy process: {slowdown:.2f}x (limit {args.max_slowdown}x)")
    sys.exit(0 if slowdown <= args.max_slowdown else 1)


if __name__ == "__main__":
    main()
