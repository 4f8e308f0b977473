"""The step-end bookkeeping SFT and GRPO share (`stagewise.training.loop.StepEnd`) and the epoch order/position
(`TrainState.epoch_order`, `TrainState.advance`)."""

from types import SimpleNamespace

import numpy as np
import pytest

from stagewise.training import StepEnd, TrainState, epoch_order


class Recorder:
    def __init__(self):
        self.calls = []

    def log(self, metrics, step):
        self.calls.append(("log", step, dict(metrics)))

    def save(self, state, model, tokenizer):
        self.calls.append(("save", state.step))


class Stopper:
    def __init__(self, stop_at):
        self.stop_at, self.stopped, self.seen = stop_at, False, []

    def after_eval(self, metrics, step, *args):
        self.seen.append((step, metrics["eval/accuracy"]))
        self.stopped = step >= self.stop_at


class Guard:
    def error(self, step, root):
        return RuntimeError(f"non-finite at step {step} in {root}")


def make_end(rec, stopper=None, total=6):
    acc = SimpleNamespace(num_processes=1, is_main_process=True)
    return StepEnd(acc, SimpleNamespace(save=rec.save), "model", "tok", SimpleNamespace(root="/run"), rec, stopper,
                   Guard(), eval_steps=2, save_steps=3, total_steps=total)


def test_evals_every_eval_steps_and_saves_every_save_steps_but_not_at_the_last_step():
    rec = Recorder()
    end = make_end(rec)
    state = TrainState()
    stops = []
    for step in range(1, 7):
        state.step = step
        stops.append(end.after_step(state, lambda: {"eval/accuracy": 0.5}, nan_stop=False))
    assert stops == [False] * 6
    assert rec.calls == [("log", 2, {"eval/accuracy": 0.5}), ("save", 3), ("log", 4, {"eval/accuracy": 0.5})]
    assert end.after_step(state, None, nan_stop=False) is False  # no held-out eval: nothing logged


def test_early_stopping_sees_each_eval_and_stops_the_loop():
    rec, stopper = Recorder(), Stopper(stop_at=4)
    end = make_end(rec, stopper, total=10)
    state = TrainState()
    out = []
    for step in (2, 4):
        state.step = step
        out.append(end.after_step(state, lambda: {"eval/accuracy": step / 10}, nan_stop=False))
    assert out == [False, True] and stopper.seen == [(2, 0.2), (4, 0.4)]


def test_a_nan_stop_saves_a_checkpoint_then_raises_the_guards_error():
    rec = Recorder()
    end = make_end(rec)
    state = TrainState(step=5)
    with pytest.raises(RuntimeError, match="non-finite at step 5 in /run"):
        end.after_step(state, None, nan_stop=True)
    assert rec.calls == [("save", 5)]


def test_advance_moves_to_the_next_epoch_after_steps_per_epoch_batches():
    state = TrainState()
    positions = []
    for _ in range(5):
        state.advance(steps_per_epoch=2)
        positions.append((state.epoch, state.batch_in_epoch))
    assert positions == [(0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    a, b = epoch_order(10, seed=3, epoch=1), epoch_order(10, seed=3, epoch=1)
    assert np.array_equal(a, b) and sorted(a.tolist()) == list(range(10))
    assert not np.array_equal(a, epoch_order(10, seed=3, epoch=2))
    assert np.array_equal(TrainState(epoch=1).epoch_order(10, seed=3), a)
