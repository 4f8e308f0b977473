"""Run a curriculum: an ordered list of stages, each a separate ``train.py`` process, wired output to input.

    python train.py                                    # the default: pipeline=tiny
    python train.py pipeline=deepanalyze               # vocab -> single-ability SFT -> cold start -> agentic RL
    python train.py pipeline=r1 run_id=<id>            # rerun: finished stages are skipped

Single stage or pipeline (`run_mode`): ``conf/train.yaml`` selects ``pipeline: tiny`` and no stage; every
``conf/stage/*.yaml`` overrides ``/pipeline`` to ``none``, so ``stage=sft`` (directly or through an experiment file)
runs that one stage. Asking for both a stage and a pipeline is an error, and so is ``pipeline=none`` with no stage.

A pipeline file (``conf/pipeline/<name>.yaml``) is ``name`` + ``stages: [{name, overrides: [...]}, ...]``; each
stage's overrides must choose a stage (``stage=...`` or ``experiment=...``). Every stage is composed before the
first one starts, so a typo in stage 5 fails now, not after hours of stage 1.

Wiring (appended after the stage's own overrides, so they win over its experiment file):
  * a stage that writes ``final/`` (vocab, sft, grpo) becomes the later stages' ``model.name_or_path``, unless a
    stage sets ``model.name_or_path`` itself;
  * a rejection-sampling stage's ``sft.parquet`` becomes the data of the *next* SFT stage
    (``data.sources=[{path: <rs>/sft.parquet, adapter: messages}]``), unless that stage sets ``data.sources``;
  * ``@<stage name>/`` inside any override is replaced by that earlier stage's folder, e.g.
    ``"data.sources=[{path:'@rejection_sampling/sft.parquet',adapter:messages}]"`` (how pipeline=r1 hands the
    stage-3 prompts to utility RL);
  * eval stages read the current model and change nothing.
Every stage also gets the pipeline run's own overrides (``python train.py pipeline=r1 hardware=8xa100`` gives every
stage ``hardware=8xa100``) and runs in its own folder ``<pipeline run>/<NN>_<name>/`` (so it can relaunch itself on
several GPUs). ``pipeline_state.json`` records each finished stage with its overrides, outputs and metrics; a rerun
with the same ``run_id`` skips finished stages (and warns if a finished stage's overrides have since changed); an
interrupted stage resumes from its last checkpoint. Preemption: SIGUSR1/SIGTERM to the pipeline process are forwarded
to the running stage, which checkpoints at its next step boundary and exits 75; the pipeline records it under
``interrupted`` in ``pipeline_state.json`` and exits 75 too (a stage that exits 75 by itself does the same), so SLURM
requeues and the rerun resumes that stage. The end prints one line per stage with its key eval metrics and
writes ``pipeline_summary.json``.

Configs: a pipeline run's own config is its stage list plus the run's overrides (``--cfg job`` prints that, and it
runs as printed); every stage composes its own config afresh from ``conf/`` with those overrides and its own, and its
folder's ``.hydra/config.yaml`` is exactly the config that stage ran (rerun one stage alone from it with
``--config-dir <stage>/.hydra --config-name config hydra.run.dir=<new folder>``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from omegaconf import DictConfig

from stagewise.hydra_config import ConfigValueError
from stagewise.run_folder import RUN_ID_ENV
from stagewise.training.preemption import REQUEUE_EXIT_CODE

log = logging.getLogger(__name__)

STATE_FILE = "pipeline_state.json"
SUMMARY_FILE = "pipeline_summary.json"
STAGE_REF = re.compile(r"@([A-Za-z0-9_.\-]+)/")
# metrics shown in the summary line, in this order of preference (then any other eval/ and rs/ keys)
SUMMARY_KEYS = ("eval/accuracy_start", "eval/accuracy", "eval/pass@1", "eval/reward/total/mean", "eval/loss",
                "rs/acceptance_rate", "rs/rows")


@dataclass
class StageRecord:
    index: int
    name: str
    stage: str
    run_dir: str
    seconds: float
    outputs: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    overrides: list = field(default_factory=list)


# ============================================================================================ mode
def run_mode(cfg: DictConfig, choices: Mapping[str, Optional[str]]) -> str:
    """``"pipeline"`` or ``"stage"``. ``choices`` are Hydra's group choices (``HydraConfig.get().runtime.choices``);
    a config printed by ``--cfg job`` and fed back has no ``stage`` group at all and runs as the stage it holds."""
    stage_choice = choices.get("stage")
    if cfg.pipeline.name:
        if stage_choice:
            raise ConfigValueError(f"both pipeline={cfg.pipeline.name} and a stage (stage={stage_choice}, directly or "
                                   "via experiment=) were chosen: drop one (pipeline=none runs a single stage)")
        return "pipeline"
    if "stage" in choices and not stage_choice:
        raise ConfigValueError("pipeline=none but no stage chosen: add stage=vocab|sft|grpo|rejection_sampling|eval "
                               "or experiment=<recipe>")
    return "stage"


# ============================================================================================ overrides
def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def passthrough_overrides(task_overrides: list[str]) -> list[str]:
    """The user's overrides of the pipeline run that every stage inherits: not the pipeline choice itself, not the
    run id, and of Hydra's own settings only ``hydra.searchpath`` (so stages find the same extra config dirs)."""
    def keep(o: str) -> bool:
        key = override_key(o)
        return not key.startswith(("pipeline", "run_id")) and (not key.startswith("hydra")
                                                                or key == "hydra.searchpath")

    return [o for o in task_overrides if keep(o)]


def sets_key(overrides: list[str], prefix: str) -> bool:
    return any(override_key(o) == prefix or override_key(o).startswith(prefix + ".") for o in overrides)


def expand_stage_refs(overrides: list[str], folders: Mapping[str, str], stage: str) -> list[str]:
    """Replace ``@<name>/`` with ``<folder of stage name>/``; the name must be an earlier stage of the pipeline."""
    def sub(m: re.Match) -> str:
        if m.group(1) not in folders:
            raise ValueError(f"pipeline stage {stage!r}: '@{m.group(1)}/' does not name an earlier stage "
                             f"(earlier stages: {sorted(folders)})")
        return folders[m.group(1)].rstrip("/") + "/"

    return [STAGE_REF.sub(sub, o) for o in overrides]


def wiring_overrides(kind: str, spec_overrides: list[str], model_path: str | None, rs_parquet: str | None
                     ) -> list[str]:
    """Model and data wiring of one stage (see the module docstring); explicit settings of the stage win."""
    out = []
    if model_path and not sets_key(spec_overrides, "model.name_or_path"):
        out.append(f"model.name_or_path={model_path}")
    if rs_parquet and kind == "sft" and not sets_key(spec_overrides, "data.sources"):
        out.append(f"data.sources=[{{path:'{rs_parquet}',adapter:messages}}]")
    return out


def advance_wiring(kind: str, outputs: dict, model_path: str | None, rs_parquet: str | None
                   ) -> tuple[str | None, str | None]:
    """``(model_path, rs_parquet)`` after a stage: its ``final/`` is the new model; its ``sft.parquet`` waits for
    the next SFT stage, which consumes it."""
    if kind == "sft":
        rs_parquet = None
    return outputs.get("final", model_path), outputs.get("sft_parquet", rs_parquet)


# ============================================================================================ state
def load_state(root: Path) -> dict[str, StageRecord]:
    path = root / STATE_FILE
    if not path.exists():
        return {}
    try:
        return {r["name"]: StageRecord(**r) for r in json.loads(path.read_text())["finished"]}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a pipeline state file ({e}); move it away to start this pipeline over")


def save_state(root: Path, finished: dict[str, StageRecord], interrupted: Optional[dict] = None) -> None:
    """``{"finished": [...], "interrupted": {name, run_dir, exit, signal, checkpoint} | null}``: ``interrupted`` is the
    stage a preemption stopped (it resumes from ``checkpoint`` on the rerun)."""
    tmp = root / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps({"finished": [asdict(r) for r in finished.values()], "interrupted": interrupted},
                              indent=2))
    tmp.replace(root / STATE_FILE)


def latest_checkpoint(stage_dir: Path) -> Optional[str]:
    from stagewise.run_folder import RunFolder

    found = RunFolder(stage_dir).latest_checkpoint()
    return str(found) if found is not None else None


# ============================================================================================ preemption
class ForwardSignals:
    """While a pipeline runs: SIGUSR1/SIGTERM (and submitit's preemption signal) are recorded and forwarded to the
    running stage process (SIGINT is recorded only: a terminal's Ctrl-C reaches the stage itself), which
    checkpoints at its next step boundary and exits with the requeue code; the pipeline then records the stage
    as interrupted and exits with the same code. Without this the parent died at once ("User defined signal 1")
    and left its child running, orphaned."""

    def __init__(self) -> None:
        from stagewise.training.preemption import DEFAULT_SIGNALS, _signal, submitit_preempt_signal

        self.signals = [_signal(s) for s in DEFAULT_SIGNALS]
        extra = submitit_preempt_signal()
        if extra is not None and extra not in self.signals:
            self.signals.append(extra)
        self.received: Optional[signal.Signals] = None
        self.child: Optional[subprocess.Popen] = None
        self._previous: dict = {}

    def _on_signal(self, signum: int, frame) -> None:
        first = self.received is None
        self.received = signal.Signals(signum)
        child = self.child
        # Ctrl-C reaches the running stage by itself (one process group); forwarding it would be its second Ctrl-C
        if child is not None and child.poll() is None and signum != signal.SIGINT:
            try:
                child.send_signal(signum)
            except ProcessLookupError:
                pass
        if first:
            os.write(2, f"[stagewise] pipeline got {self.received.name}: forwarded to the running stage; exiting "
                        f"with code {REQUEUE_EXIT_CODE} once it has checkpointed\n".encode())

    def __enter__(self) -> "ForwardSignals":
        global _GUARD
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        _GUARD = self
        return self

    def __exit__(self, *exc) -> None:
        global _GUARD
        for sig, prev in self._previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()
        _GUARD = None


_GUARD: Optional[ForwardSignals] = None


class StageProcess:
    """One stage's ``train.py`` child, registered with the signal forwarder while it runs; killed if the pipeline
    itself dies of an exception (never left orphaned)."""

    def __init__(self, cmd: list[str], env: dict):
        self.proc = subprocess.Popen(cmd, env=env)

    def __enter__(self) -> "StageProcess":
        if _GUARD is not None:
            _GUARD.child = self.proc
        return self

    def wait(self) -> int:
        while True:
            try:
                return self.proc.wait()
            except KeyboardInterrupt:  # Ctrl-C reaches the child too (same process group); wait for it
                continue

    def __exit__(self, *exc) -> None:
        if _GUARD is not None:
            _GUARD.child = None
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def stage_kind(overrides: list[str], where: str = "") -> str:
    """The stage a list of overrides selects, composed for real (experiment files count)."""
    from hydra import compose

    from stagewise.hydra_config import validate_config

    cfg = compose(config_name="train", return_hydra_config=True,
                  overrides=[o for o in overrides if not override_key(o).startswith("hydra.")])
    validate_config(cfg)  # a key that stage's schema lacks fails now, before the first stage runs
    if not cfg.hydra.runtime.choices.get("stage"):
        raise ValueError(f"pipeline stage {where!r} chooses no stage: add stage=<name> or experiment=<recipe> to its "
                         "overrides")
    return str(cfg.stage.name)


# ============================================================================================ run
def run_pipeline(cfg: DictConfig, task_overrides: list[str], hydra_overrides: list[str] = ()) -> dict:
    """``task_overrides`` / ``hydra_overrides``: the pipeline run's own (``HydraConfig.get().overrides``)."""
    root = Path(cfg.run_dir)
    root.mkdir(parents=True, exist_ok=True)
    stages = list(cfg.pipeline.stages)
    names = [s.name for s in stages]
    if not stages:
        raise ValueError(f"pipeline {cfg.pipeline.name!r} has no stages (pipeline.stages is empty)")
    if len(set(names)) != len(names):
        raise ValueError(f"pipeline {cfg.pipeline.name!r} has duplicate stage names {names}")
    base = passthrough_overrides(list(task_overrides) + list(hydra_overrides))
    folders = {s.name: str(root / f"{i:02d}_{s.name}") for i, s in enumerate(stages)}
    # compose every stage now: a bad override in the last stage fails before the first one runs
    kinds = []
    for i, spec in enumerate(stages):
        earlier = {n: folders[n] for n in names[:i]}
        kinds.append(stage_kind(base + expand_stage_refs(list(spec.overrides), earlier, spec.name) + ["pipeline=none"],
                                where=spec.name))
    finished = load_state(root)
    log.info("pipeline %s: %d stages (%s) in %s", cfg.pipeline.name, len(stages),
             " -> ".join(f"{n}[{k}]" for n, k in zip(names, kinds)), root)
    with ForwardSignals() as guard:
        return _run_stages(cfg, root, stages, names, kinds, folders, base, finished, guard)


def _run_stages(cfg: DictConfig, root: Path, stages: list, names: list[str], kinds: list[str],
                folders: dict[str, str], base: list[str], finished: dict[str, StageRecord],
                guard: "ForwardSignals") -> dict:
    model_path: str | None = None
    rs_parquet: str | None = None
    for i, (spec, kind) in enumerate(zip(stages, kinds)):
        if guard.received is not None and spec.name not in finished:  # signalled after the last stage ended
            save_state(root, finished, interrupted={"name": spec.name, "run_dir": folders[spec.name], "exit": None,
                                                    "signal": guard.received.name, "checkpoint": None})
            raise SystemExit(REQUEUE_EXIT_CODE)
        spec_overrides = expand_stage_refs(list(spec.overrides), {n: folders[n] for n in names[:i]}, spec.name)
        if spec.name in finished:
            rec = finished[spec.name]
            log.info("[%d/%d] %s: finished earlier (%s), skipped", i + 1, len(stages), spec.name, rec.run_dir)
            if rec.overrides and rec.overrides != spec_overrides:
                log.warning("pipeline stage %r finished with overrides %s, but the pipeline now gives %s; it is still "
                            "skipped (remove it from %s to rerun it)", spec.name, rec.overrides, spec_overrides,
                            root / STATE_FILE)
        else:
            stage_dir = Path(folders[spec.name])
            cmd = [sys.executable, str(Path(sys.argv[0]).resolve()), *base, *spec_overrides,
                   *wiring_overrides(kind, spec_overrides, model_path, rs_parquet),
                   "pipeline=none", f"hydra.run.dir={stage_dir}", f"task_name={cfg.task_name}"]
            env = {**os.environ, RUN_ID_ENV: f"{cfg.run_id}/{stage_dir.name}"}
            log.info("[%d/%d] %s: %s", i + 1, len(stages), spec.name, " ".join(cmd[2:]))
            t0 = time.time()
            with StageProcess(cmd, env) as child:
                if guard.received is not None:  # signalled between two stages: nothing to checkpoint
                    child.proc.send_signal(guard.received)
                returncode = child.wait()
            if returncode == REQUEUE_EXIT_CODE or (guard.received is not None and returncode != 0):
                save_state(root, finished, interrupted={
                    "name": spec.name, "run_dir": str(stage_dir), "exit": returncode,
                    "signal": guard.received.name if guard.received is not None else None,
                    "checkpoint": latest_checkpoint(stage_dir)})
                log.warning("pipeline stage %r stopped for requeue (exit %d%s); its checkpoint: %s. Rerun with "
                            "run_id=%s to resume it.", spec.name, returncode,
                            f", after {guard.received.name}" if guard.received is not None else "",
                            latest_checkpoint(stage_dir), cfg.run_id)
                raise SystemExit(REQUEUE_EXIT_CODE)
            if returncode != 0:
                raise SystemExit(f"pipeline stage {spec.name!r} failed (exit {returncode}); see "
                                 f"{stage_dir}/train.log. Rerun with run_id={cfg.run_id} to resume from here.")
            rec = StageRecord(i, spec.name, kind, str(stage_dir), round(time.time() - t0, 1),
                              outputs=stage_outputs(stage_dir), metrics=stage_metrics(stage_dir),
                              overrides=spec_overrides)
            finished[spec.name] = rec
            save_state(root, finished)
        model_path, rs_parquet = advance_wiring(kind, rec.outputs, model_path, rs_parquet)
    summary = {name: finished[name].metrics for name in names}
    (root / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    print(format_summary(cfg.pipeline.name, [finished[n] for n in names]), flush=True)
    return summary


def stage_outputs(stage_dir: Path) -> dict:
    out = {}
    if (stage_dir / "final" / "config.json").exists():
        out["final"] = str(stage_dir / "final")
    if (stage_dir / "sft.parquet").exists():
        out["sft_parquet"] = str(stage_dir / "sft.parquet")
    return out


def stage_metrics(stage_dir: Path) -> dict:
    """The stage's ``result.json`` (rejection sampling, eval) if it wrote one, else the latest value of every key
    of its ``metrics.jsonl`` (so the final eval and the last training step both show), plus
    ``eval/accuracy_start``: the first held-out accuracy it logged (its step-0 baseline)."""
    if (stage_dir / "result.json").exists():
        return json.loads((stage_dir / "result.json").read_text())
    path = stage_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    latest: dict = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if "eval/accuracy" in record and "eval/accuracy_start" not in latest:
                latest["eval/accuracy_start"] = record["eval/accuracy"]  # the stage's baseline (its step-0 eval)
            latest.update(record)
    return latest


def summary_keys(metrics: Mapping) -> list[str]:
    keys = [k for k in SUMMARY_KEYS if k in metrics]
    keys += [k for k in metrics if k.startswith(("eval/pass@", "rs/")) and k not in keys]
    return [k for k in keys if isinstance(metrics[k], (int, float))][:5]


def summary_value(key: str, value: float) -> str:
    """Fractions (accuracy, pass@k, acceptance rate) as percentages; anything else as a number."""
    if any(part in key for part in ("accuracy", "pass@", "_rate")):
        return f"{100 * value:.1f}%"
    return f"{value:.4g}"


def format_summary(name: str, records: list[StageRecord]) -> str:
    lines = [f"pipeline {name}: done", f"{'stage':<22}{'kind':<20}{'seconds':>9}  key metrics"]
    for r in records:
        shown = ", ".join(f"{k}={summary_value(k, r.metrics[k])}" for k in summary_keys(r.metrics))
        lines.append(f"{r.name:<22}{r.stage:<20}{r.seconds:>9.1f}  {shown}")
    return "\n".join(lines)
