"""The bookkeeping that ends every optimizer step and the run, the same for SFT and GRPO.

    end = StepEnd(acc, ckpt, model, tokenizer, run_folder, tracker, stopper, nan_guard,
                  eval_steps=st.eval_steps, save_steps=st.save_steps, total_steps=total_steps)
    ...  # one optimizer step; state.step += 1
    if end.after_step(state, evaluate, nan_stop=...):   # True: early stopping says stop
        break
    final_metrics = end.finish(state, evaluate)        # the last eval, then final/ (the best model)

After a step, in this order: the held-out eval every ``stage.eval_steps`` (not at the last step: `finish` evaluates
there), logged and shown to early stopping; on a NaN/inf stop (`stagewise.tracking.alerts.NanGuard`) a checkpoint,
then the guard's error; a checkpoint every ``stage.save_steps`` (not at the last step: ``final/`` is written
there); a checkpoint and exit when the job is being preempted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional

import torch

from stagewise.training.early_stopping import save_final_model
from stagewise.training.preemption import checkpoint_and_exit_if_preempted

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase

    from stagewise.run_folder import RunFolder
    from stagewise.tracking import Tracker
    from stagewise.tracking.alerts import NanGuard
    from stagewise.training.checkpoint import CheckpointManager
    from stagewise.training.early_stopping import EarlyStopping

Evaluate = Optional[Callable[[], Dict[str, Any]]]  # the stage's held-out metrics now; None: the stage has none


@dataclass
class StepEnd:
    acc: "Accelerator"
    ckpt: "CheckpointManager"
    model: torch.nn.Module  # the prepared (possibly wrapped) model
    tokenizer: "PreTrainedTokenizerBase"
    run_folder: "RunFolder"
    tracker: "Tracker"
    stopper: Optional["EarlyStopping"]
    nan_guard: "NanGuard"
    eval_steps: int
    save_steps: int
    total_steps: int

    def log_eval(self, metrics: Dict[str, Any], step: int) -> None:
        """Log held-out metrics and let early stopping observe them (it keeps the best model in ``best/``)."""
        self.tracker.log(metrics, step=step)
        if self.stopper is not None:
            self.stopper.after_eval(metrics, step, self.acc, self.model, self.tokenizer, self.run_folder)

    def after_step(self, state, evaluate: Evaluate, *, nan_stop: bool) -> bool:
        """Everything after ``state.step`` was advanced (see the module docstring). True: stop training."""
        step = state.step
        if evaluate is not None and self.eval_steps > 0 and step % self.eval_steps == 0 and step < self.total_steps:
            self.log_eval(evaluate(), step)

        def save():
            return self.ckpt.save(state, self.model, self.tokenizer)

        if nan_stop:
            save()
            raise self.nan_guard.error(step, str(self.run_folder.root))
        if self.save_steps and step % self.save_steps == 0 and step < self.total_steps:
            save()
        checkpoint_and_exit_if_preempted(self.acc, save)
        return self.stopper is not None and self.stopper.stopped

    def finish(self, state, evaluate: Evaluate) -> Dict[str, Any]:
        """The last held-out eval (logged, shown to early stopping), then ``final/``: the best model under early
        stopping, else the last. Returns the eval's metrics ({} without one)."""
        metrics: Dict[str, Any] = {}
        if evaluate is not None:
            metrics = dict(evaluate())
            self.log_eval(metrics, state.step)
        save_final_model(self.acc, self.model, self.tokenizer, self.run_folder, self.stopper, state.step)
        return metrics
