"""Run a curriculum: an ordered list of stages, each a separate ``train.py`` process, wired output to input.

    python train.py pipeline=tiny                      # the default
    python train.py pipeline=deepanalyze               # vocab -> single-ability SFT -> cold start -> agentic RL
    python train.py pipeline=r1 run_id=<id>            # rerun: finished stages are skipped

Wiring: a stage that writes ``final/`` (vocab, sft, grpo) becomes the next stages' ``model.name_or_path``; a
rejection-sampling stage's ``sft.parquet`` becomes the next SFT stage's data. Eval stages read the current model
and change nothing. Each stage runs in its own process (so it can relaunch itself on several GPUs) in its own
folder ``<pipeline run>/<NN>_<name>/``, and ``pipeline_state.json`` records each finished stage with its outputs.
A rerun with the same ``run_id`` skips finished stages; an interrupted stage resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from stagewise.run_folder import RUN_ID_ENV

log = logging.getLogger(__name__)

STATE_FILE = "pipeline_state.json"
MODEL_PRODUCING = ("vocab", "sft", "grpo")


@dataclass
class StageRecord:
    index: int
    name: str
    stage: str
    run_dir: str
    seconds: float
    outputs: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)


def load_state(root: Path) -> dict[str, StageRecord]:
    path = root / STATE_FILE
    if not path.exists():
        return {}
    return {r["name"]: StageRecord(**r) for r in json.loads(path.read_text())["finished"]}


def save_state(root: Path, finished: dict[str, StageRecord]) -> None:
    tmp = root / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps({"finished": [asdict(r) for r in finished.values()]}, indent=2))
    tmp.replace(root / STATE_FILE)


def stage_kind(overrides: list[str]) -> str:
    """The stage name a list of overrides selects (composed for real, so experiment files count)."""
    from hydra import compose

    return compose(config_name="train", overrides=[o for o in overrides if not o.startswith("hydra.")]).stage.name


def passthrough_overrides(task_overrides: list[str]) -> list[str]:
    """The user's overrides of the pipeline run that every stage inherits (not the pipeline choice itself)."""
    return [o for o in task_overrides if not o.lstrip("+~").startswith(("pipeline", "run_id", "hydra."))]


def wiring_overrides(kind: str, model_path: str | None, rs_parquet: str | None) -> list[str]:
    out = []
    if model_path:
        out.append(f"model.name_or_path={model_path}")
    if rs_parquet and kind == "sft":
        out.append(f"data.sources=[{{path:{rs_parquet},adapter:messages}}]")
    return out


def run_pipeline(cfg: DictConfig, task_overrides: list[str]) -> dict:
    root = Path(cfg.run_dir)
    root.mkdir(parents=True, exist_ok=True)
    finished = load_state(root)
    stages = list(cfg.pipeline.stages)
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"pipeline {cfg.pipeline.name!r} has duplicate stage names {names}")
    base = passthrough_overrides(list(task_overrides))
    model_path: str | None = None
    rs_parquet: str | None = None
    log.info("pipeline %s: %d stages in %s", cfg.pipeline.name, len(stages), root)
    for i, spec in enumerate(stages):
        kind = stage_kind(base + list(spec.overrides))
        if spec.name in finished:
            rec = finished[spec.name]
            log.info("[%d/%d] %s: finished earlier, skipped", i + 1, len(stages), spec.name)
        else:
            stage_dir = root / f"{i:02d}_{spec.name}"
            cmd = [sys.executable, str(Path(sys.argv[0]).resolve()), *base, *spec.overrides,
                   *wiring_overrides(kind, model_path, rs_parquet),
                   f"hydra.run.dir={stage_dir}", f"task_name={cfg.task_name}"]
            env = {**os.environ, RUN_ID_ENV: f"{cfg.run_id}/{i:02d}_{spec.name}"}
            log.info("[%d/%d] %s: %s", i + 1, len(stages), spec.name, " ".join(cmd[2:]))
            t0 = time.time()
            proc = subprocess.run(cmd, env=env)
            if proc.returncode != 0:
                raise SystemExit(f"pipeline stage {spec.name!r} failed (exit {proc.returncode}); see "
                                 f"{stage_dir}/train.log. Rerun with run_id={cfg.run_id} to resume from here.")
            rec = StageRecord(i, spec.name, kind, str(stage_dir), round(time.time() - t0, 1),
                              outputs=_outputs(stage_dir), metrics=_last_metrics(stage_dir))
            finished[spec.name] = rec
            save_state(root, finished)
        model_path = rec.outputs.get("final", model_path)
        rs_parquet = rec.outputs.get("sft_parquet", rs_parquet)
    summary = {name: r.metrics for name, r in finished.items()}
    (root / "pipeline_summary.json").write_text(json.dumps(summary, indent=2))
    _print_summary(cfg.pipeline.name, [finished[n] for n in names])
    return summary


def _outputs(stage_dir: Path) -> dict:
    out = {}
    if (stage_dir / "final" / "config.json").exists():
        out["final"] = str(stage_dir / "final")
    if (stage_dir / "sft.parquet").exists():
        out["sft_parquet"] = str(stage_dir / "sft.parquet")
    return out


def _last_metrics(stage_dir: Path) -> dict:
    """The stage's `result.json` if it wrote one, else its last metrics.jsonl record."""
    if (stage_dir / "result.json").exists():
        return json.loads((stage_dir / "result.json").read_text())
    path = stage_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1]) if lines else {}


def _print_summary(name: str, records: list[StageRecord]) -> None:
    lines = [f"pipeline {name}: done", f"{'stage':<22}{'kind':<20}{'seconds':>9}  key metrics"]
    for r in records:
        keys = [k for k in r.metrics if k.startswith(("eval/", "reward/total/mean", "accuracy"))][:4]
        shown = ", ".join(f"{k}={r.metrics[k]:.4g}" for k in keys if isinstance(r.metrics[k], (int, float)))
        lines.append(f"{r.name:<22}{r.stage:<20}{r.seconds:>9.1f}  {shown}")
    print("\n".join(lines), flush=True)
