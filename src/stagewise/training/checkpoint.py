"""Checkpoints that resume exactly, and the HF model in ``final/``.

``checkpoints/step_<N>/`` holds:
  * ``accelerate/``: model, optimizer, scheduler and every rank's RNG states (Accelerate's ``save_state``; with
    DeepSpeed this is the engine's sharded checkpoint),
  * ``model/``: HF-loadable weights and tokenizer (LoRA: the adapter),
  * ``trainer_state.json``: step, epoch, position in the epoch's (seeded) data order, and loop extras,
  * ``COMPLETE``: written last. A checkpoint without it (the job died while saving) is ignored on resume.
Data order is a pure function of (seed, epoch), so "position in the epoch" is all the dataloader state we need.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import Accelerator

from stagewise.run_folder import RunFolder
from stagewise.tracking.logs import quiet_loggers

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # optimizer steps (SFT) or prompt batches (GRPO) taken in the current epoch
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def epoch_order(self, num_rows: int, seed: int) -> np.ndarray:
        """This epoch's data order (`epoch_order`)."""
        return epoch_order(num_rows, seed, self.epoch)

    def advance(self, steps_per_epoch: int) -> None:
        """One batch of the epoch consumed; the next epoch starts after ``steps_per_epoch`` of them."""
        self.batch_in_epoch += 1
        if self.batch_in_epoch >= steps_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    @classmethod
    def from_file(cls, path: Path) -> "TrainState":
        return cls(**json.loads(Path(path).read_text()))


def epoch_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The data order of one epoch (SFT rows, GRPO prompts): a pure function of (seed, epoch), so resuming needs
    only the position in it."""
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config")


class CheckpointManager:
    def __init__(self, acc: Accelerator, run: RunFolder, keep_last: int):
        self.acc = acc
        self.run = run
        self.keep_last = keep_last

    def save(self, state: TrainState, model, tokenizer) -> Path:
        final_dir = self.run.checkpoint(state.step)
        tmp = final_dir.with_name(final_dir.name + ".tmp")
        if self.acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        self.acc.wait_for_everyone()
        with quiet_loggers("accelerate.accelerator", "accelerate.checkpointing"):  # 5 INFO lines per save
            self.acc.save_state(str(tmp / "accelerate"))
        save_hf(self.acc, model, tokenizer, tmp / "model", merge_lora=False)
        if self.acc.is_main_process:
            (tmp / "trainer_state.json").write_text(state.to_json())
            if final_dir.exists():
                shutil.rmtree(final_dir)
            tmp.rename(final_dir)
            (final_dir / "COMPLETE").touch()
            self._prune()
        self.acc.wait_for_everyone()
        log.info("checkpoint saved: %s", final_dir)
        return final_dir

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for old in self.run.list_checkpoints()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def resume_path(self, resume: str) -> Path | None:
        """``auto``: the latest complete checkpoint of this run folder; ``never`` / ``overwrite`` (a fresh start,
        `RunFolder.prepare_for`); or an explicit path."""
        if resume in ("never", "overwrite"):
            log.info("starting fresh at step 0 (resume=%s)", resume)
            return None
        if resume == "auto":
            latest = self.run.latest_checkpoint()
            if latest is None:
                log.info("starting fresh at step 0 (no checkpoint in %s)", self.run.checkpoints)
            return latest
        path = Path(resume)
        if not (path / "COMPLETE").exists():
            raise FileNotFoundError(f"resume={resume!r} is not a complete checkpoint folder (no COMPLETE marker)")
        return path

    def load(self, path: Path) -> TrainState:
        with quiet_loggers("accelerate.accelerator", "accelerate.checkpointing"):
            self.acc.load_state(str(path / "accelerate"))
        state = TrainState.from_file(path / "trainer_state.json")
        log.info("resumed from %s (step %d, epoch %d, batch %d)", path, state.step, state.epoch, state.batch_in_epoch)
        return state


def save_hf(acc: Accelerator, model, tokenizer, path: Path, merge_lora: bool = True) -> None:
    """Save an HF-loadable model. Gathers ZeRO-3 shards (every rank must call this). LoRA: merged into the base
    weights when ``merge_lora`` (so the next stage loads a plain model), else the adapter only."""
    state_dict = acc.get_state_dict(model)
    if not acc.is_main_process:
        return
    unwrapped = acc.unwrap_model(model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if _is_peft(unwrapped):
        if merge_lora:
            unwrapped.load_state_dict(state_dict)
            merged = unwrapped.merge_and_unload()
            merged.save_pretrained(path, safe_serialization=True)
            unwrapped.save_pretrained(path / "adapter")
        else:
            unwrapped.save_pretrained(path, safe_serialization=True)
    else:
        unwrapped.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(path)


def save_final(acc: Accelerator, model, tokenizer, run: RunFolder) -> Path:
    save_hf(acc, model, tokenizer, run.final, merge_lora=True)
    acc.wait_for_everyone()
    return run.final
