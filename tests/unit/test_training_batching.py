"""stagewise.training.batching: the one token-budget splitter (SFT's rows and GRPO's shared-prompt discount), the
guarded optimizer step, and the log window both stages use. Exactness of whole updates under every split is in
test_grpo_loop.py (GRPO, padded vs packed) and tests/integration/test_sft_stage.py (SFT, accumulation and ZeRO-3)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from stagewise.tracking.alerts import SKIP, STOP, UPDATE, NanGuard
from stagewise.tracking.window import Window
from stagewise.training.batching import guarded_optimizer_step, micro_batch_parts, split_by_budget, sum_over_ranks


def test_rows_or_a_token_budget():
    lengths = [50, 30, 90, 200, 10, 10]
    assert micro_batch_parts(lengths, 4, 0) == [[0, 1, 2, 3], [4, 5]]
    # at most 100 tokens each, consecutive, order kept; the 200-token row goes alone
    assert micro_batch_parts(lengths, 4, 100) == [[0, 1], [2], [3], [4, 5]]
    assert micro_batch_parts(lengths, 4, 1000) == [[0, 1, 2, 3, 4, 5]]  # the budget, not the row count, decides
    assert split_by_budget([5, 3, 8, 2, 2, 15, 9], 10) == [[0, 1], [2, 3], [4], [5], [6]]
    assert split_by_budget([], 10) == []


def test_a_row_after_its_group_costs_only_its_completion():
    """GRPO's packed rows carry a group's prompt once: prompts of 6 tokens, completions of 2, 3, 4 (group A) and 5
    (group B). Full costs 8, 9, 10, 11; after a same-prompt row, 3 and 4."""
    costs, after = [8, 9, 10, 11], [8, 3, 4, 11]
    # budget 16: 8 + 3 + 4 = 15 fits group A in one row; B (11) would make 26 -> its own
    assert split_by_budget(costs, 16, after) == [[0, 1, 2], [3]]
    # budget 10: 8 + 3 > 10, so row 1 opens a new part at its full cost 9; row 2 then costs 4 after it: 13 > 10
    assert split_by_budget(costs, 10, after) == [[0], [1], [2], [3]]
    # budget 12: 8 + 3 = 11 fits; + 4 = 15 does not; row 2 starts over at 10
    assert split_by_budget(costs, 12, after) == [[0, 1], [2], [3]]
    assert split_by_budget(costs, 12) == [[0], [1], [2], [3]]  # no discount: every row at full cost


def test_sum_over_ranks_on_one_process_is_the_value():
    assert sum_over_ranks(SimpleNamespace(num_processes=1), 3.5) == 3.5


def test_guarded_step_updates_skips_and_stops():
    model = torch.nn.Linear(2, 1, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    acc = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None),
                          clip_grad_norm_=torch.nn.utils.clip_grad_norm_)
    guard = NanGuard(max_consecutive=2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))

    def backward():
        model.weight.grad = torch.tensor([[3.0, 4.0]])

    backward()
    action, norm = guarded_optimizer_step(acc, model, optimizer, scheduler, 10.0, guard, 0.7)
    assert action == UPDATE and norm == pytest.approx(5.0)
    assert model.weight.tolist() == [[-0.5, 0.0]]  # w - 0.5 * g
    backward()
    action, norm = guarded_optimizer_step(acc, model, optimizer, scheduler, 10.0, guard, math.nan)
    assert (action, norm) == (SKIP, None) and model.weight.grad is None  # gradients dropped, weights kept
    assert model.weight.tolist() == [[-0.5, 0.0]]
    backward()
    action, norm = guarded_optimizer_step(acc, model, optimizer, scheduler, 10.0, guard, math.inf)
    assert (action, norm) == (STOP, None) and model.weight.tolist() == [[-0.5, 0.0]]


def test_window_means_totals_and_arrays():
    w = Window()
    w.add({"loss": 1.0, "clip_ratio/low_min": 0.3, "clip_ratio/high_max": 0.1}, arrays={"x": np.array([1.0, 2.0])},
          tokens=10)
    w.add({"loss": 2.0, "clip_ratio/low_min": 0.2, "clip_ratio/high_max": 0.4}, arrays={"x": np.array([3.0])},
          tokens=5)
    w.add({"loss": 4.5})
    assert w.means() == {"loss": 2.5, "clip_ratio/low_min": 0.2, "clip_ratio/high_max": 0.4}
    assert w.total("tokens") == 15 and w.total("absent") == 0 and w.steps == 3
    assert w.arrays()["x"].tolist() == [1.0, 2.0, 3.0]
    assert Window().arrays() == {} and Window().seconds() >= 0
