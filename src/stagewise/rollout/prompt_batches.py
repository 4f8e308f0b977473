"""Where a GRPO step's prompt batches come from: generated when the step asks for them (`SyncBatches`, the
synchronous loop), or ahead of time by a generator process (`AsyncBatches`, ``stage.max_staleness`` > 0, see
`stagewise.rollout.async_generation`). Both take the step's prompts in the same seeded per-epoch order
(`next_prompt_rows`) and advance the ``TrainState`` a checkpoint saves only when a batch is handed to the step."""

from __future__ import annotations

import copy
import logging
import time
from typing import TYPE_CHECKING, Dict, Protocol

import numpy as np
import torch

from stagewise.config import GRPOStage, stage_as
from stagewise.rollout import generate
from stagewise.rollout.async_generation import AsyncGenerator, trainer_threads

if TYPE_CHECKING:
    from stagewise.config import TrainConfig
    from stagewise.training import TrainState

log = logging.getLogger(__name__)


class PromptSchedule(Protocol):
    """What the batch sources read of GRPO's step plan (`stagewise.stages.grpo.StepPlan`)."""

    prompts_per_step: int
    steps_per_epoch: int
    total_steps: int
    seed: int


def next_prompt_rows(state: "TrainState", plan: PromptSchedule, num_rows: int) -> np.ndarray:
    """The next ``prompts_per_step`` dataset rows; advances ``state`` (epoch, batch_in_epoch)."""
    order = state.epoch_order(num_rows, plan.seed)
    p = plan.prompts_per_step
    rows = order[state.batch_in_epoch * p:(state.batch_in_epoch + 1) * p]
    state.advance(plan.steps_per_epoch)
    return rows


class SyncBatches:
    """The synchronous loop's batches: step ``s``'s prompts generated when step ``s`` asks, on its weights."""

    def __init__(self, rollout, train_ds, state: "TrainState", plan: PromptSchedule):
        self.rollout, self.train_ds, self.state, self.plan = rollout, train_ds, state, plan

    def next_round(self, acc) -> tuple:
        """The next prompt batch's dataset columns (this rank's rows) and its completions; advances ``state``."""
        rows = next_prompt_rows(self.state, self.plan, len(self.train_ds))
        columns = self.train_ds[[int(i) for i in rows[acc.process_index::acc.num_processes]]]
        return columns, generate(self.rollout, columns)

    def push_weights(self, policy, version: int) -> None:
        self.rollout.sync_weights(policy)

    def after_step(self, step: int) -> None:
        pass

    def metrics(self) -> Dict[str, float]:
        return {}

    def close(self) -> None:
        pass


class AsyncBatches(SyncBatches):
    """``stage.max_staleness`` = k > 0: batches from the generator process (`stagewise.rollout.async_generation`).
    Jobs are submitted k + 1 steps ahead from their own copy of the prompt position; ``state`` (what a checkpoint
    saves) advances only when a batch is trained on, so a resume generates the in-flight batches again: no prompt is
    lost or used twice. Each sample records the policy version it was generated with (``policy_version``)."""

    def __init__(self, generator: AsyncGenerator, train_ds, state: "TrainState", plan: PromptSchedule, max_staleness: int,
                 threads_before: int):
        super().__init__(None, train_ds, state, plan)
        self.generator, self.max_staleness, self.threads_before = generator, max_staleness, threads_before
        self.ahead = copy.deepcopy(state)  # the submission position, up to k + 1 batches past ``state``
        self.submitted: Dict[int, tuple] = {}  # step -> (its dataset rows, their columns), until trained on
        self.last: Dict[str, float] = {}

    @classmethod
    def start(cls, cfg: TrainConfig, policy, train_ds, state: "TrainState", plan: PromptSchedule) -> "AsyncBatches":
        st = stage_as(cfg, GRPOStage)
        threads_before = torch.get_num_threads()
        torch.set_num_threads(trainer_threads(st.generator_threads))  # the generator's cores are its own
        log.info("asynchronous GRPO: a generator process (%d torch thread(s); the trainer keeps %d) generates up to "
                 "%d step(s) ahead", st.generator_threads, torch.get_num_threads(), st.max_staleness)
        batches = cls(AsyncGenerator(cfg, policy, version=state.step, threads=st.generator_threads), train_ds,
                      state, plan, st.max_staleness, threads_before)
        for step in range(state.step, min(state.step + st.max_staleness + 1, plan.total_steps)):
            batches.submit(step)
        return batches

    def submit(self, step: int) -> None:
        rows = [int(i) for i in next_prompt_rows(self.ahead, self.plan, len(self.train_ds))]
        self.submitted[step] = (rows, self.train_ds[rows])
        self.generator.submit(step, rows, self.submitted[step][1])

    def next_round(self, acc) -> tuple:
        rows = [int(i) for i in next_prompt_rows(self.state, self.plan, len(self.train_ds))]
        start = time.perf_counter()
        got = self.generator.take()
        staleness = self.state.step - got.version
        if got.rows != rows or not 0 <= staleness <= self.max_staleness:
            raise RuntimeError(f"asynchronous GRPO: step {self.state.step} got the batch of rows {got.rows[:4]}... "
                               f"generated at version {got.version} (expected rows {rows[:4]}..., staleness <= "
                               f"{self.max_staleness})")
        got.batch.env_columns["policy_version"] = [got.version] * len(got.batch)
        self.last = {"async/staleness": float(staleness), "async/policy_version": float(got.version),
                     "async/wait_s": time.perf_counter() - start, "async/generate_s": got.generate_s,
                     "async/generator_idle_s": got.idle_s, "async/weight_load_s": got.load_s}
        if got.batch.timing is not None:  # the generator's code-run seconds: not a part of the trainer's wait
            self.last["async/env_s"] = got.batch.timing.env_s
            got.batch.timing = None
        return self.submitted.pop(self.state.step)[1], got.batch

    def push_weights(self, policy, version: int) -> None:
        start = time.perf_counter()
        self.generator.publish(policy, version)
        self.last["async/push_s"] = time.perf_counter() - start

    def after_step(self, step: int) -> None:
        if step + self.max_staleness < self.plan.total_steps:
            self.submit(step + self.max_staleness)
        if step >= self.plan.total_steps:  # nothing left to generate: the final eval gets every thread back
            torch.set_num_threads(self.threads_before)

    def metrics(self) -> Dict[str, float]:
        return dict(self.last)

    def close(self) -> None:
        self.generator.close()
        torch.set_num_threads(self.threads_before)
