"""GRPO's samples/step_N.parquet: one readable row per trajectory, with its finish reason, turns, code calls, code
errors and the reward of each function, written and read back as a real parquet file."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch

from stagewise.rewards import RewardRunner
from stagewise.rollout.base import RolloutBatch
from stagewise.stages.grpo import GenerationRound, Groups
from stagewise.tracking.samples import GroupKey
from stagewise.tracking.samples import write_samples

CODE = "<Analyze>count</Analyze>\n<Code>\n```python\nprint(18)\n```\n</Code>\n<Execute>\n18\n\n</Execute>\n"
RIGHT = CODE + "<Understand>18 rows</Understand>\n<Answer>Answer: 18</Answer>"
WRONG = CODE + "<Answer>Answer: 17</Answer>"
NO_ANALYZE = "<Answer>Answer: 18</Answer>"
CUT = CODE + "<Analyze>more"


def test_samples_parquet_records_the_trajectory_facts_and_each_reward(tmp_path):
    texts = [RIGHT, WRONG, NO_ANALYZE, CUT]
    columns = {"turns": [2, 2, 1, 2], "code_calls": [1, 1, 0, 1], "code_errors": [0, 0, 0, 0],
               "code_timeouts": [0, 0, 0, 0], "answered": [1, 1, 1, 0],
               "finish_reason": ["answer", "answer", "answer", "context"]}
    batch = RolloutBatch(prompt_ids=[[1, 2]] * 2 + [[3]] * 2, completion_ids=[[5] * 4, [6] * 3, [7] * 2, [8]],
                         texts=texts, truncated=[False, False, False, True], n=2, env_columns=columns)
    rows = {"prompt": ["How many rows?", "How many rows?"],
            "reward_spec": [{"method": "datatask", "ground_truth": "t"}] * 2, "answer": ["18", "18"]}
    reward_cols = {"reward_spec": [r for r in rows["reward_spec"] for _ in range(2)],
                   "answer": [a for a in rows["answer"] for _ in range(2)], **columns}
    with RewardRunner({"functions": [{"name": "deepanalyze"}, {"name": "format", "weight": 0.5}]}) as runner:
        result = runner(texts, **reward_cols)
    per_fn = {name: torch.tensor([np.nan if v is None else v for v in values], dtype=torch.float32)
              for name, values in result.per_fn.items()}  # as the GRPO step builds them
    groups = Groups(samples=[], log_arrays={}, reward_names=list(per_fn), num_tokens=0,
                    rounds=[GenerationRound(batch=batch, columns=rows, total=torch.tensor(result.total), per_fn=per_fn,
                                            arrays={}, zero_std=np.zeros((1, 2), dtype=bool))],
                    advantages={GroupKey(round=0, rank=0, group=0): torch.tensor([0.7, -0.7])}, rank=0, n=2)
    acc = SimpleNamespace(num_processes=1, is_main_process=True)
    path = tmp_path / "samples" / "step_3.parquet"
    write_samples(acc, path, groups.records(), step=3)

    df = pd.read_parquet(path)
    assert list(df["finish_reason"]) == ["answer", "answer", "answer", "context"]
    assert list(df["turns"]) == [2, 2, 1, 2]
    assert list(df["code_calls"]) == [1, 1, 0, 1] and list(df["code_errors"]) == [0, 0, 0, 0]
    assert list(df["answered"]) == [1, 1, 1, 0]
    # deepanalyze (datatask, no judge): mean(answer, code); -1 at the format gate
    assert list(df["reward_deepanalyze"]) == [1.0, 0.5, -1.0, -1.0]
    assert list(df["reward_format"]) == [0.0, 0.0, 0.0, 0.0]  # R1's <think>/<answer> format: not this layout
    assert list(df["reward_total"]) == [1.0, 0.5, -1.0, -1.0]  # 1.0 * deepanalyze + 0.5 * format
    assert list(df["step"]) == [3] * 4
    assert list(df["prompt_index"]) == [0, 0, 1, 1] and list(df["sample"]) == [0, 1, 0, 1]  # eval's names too
    assert list(df["kept"]) == [True, True, False, False]
    assert df["advantage"].tolist()[:2] == [np.float32(0.7).item(), np.float32(-0.7).item()]
    assert df["advantage"].isna().tolist()[2:] == [True, True]
    assert list(df["answer"]) == ["18", "18", "18", "18"] and df["completion"][0] == RIGHT
    assert list(df["truncated"]) == [False, False, False, True]


def test_single_turn_rows_get_a_finish_reason_too(tmp_path):
    batch = RolloutBatch(prompt_ids=[[1], [1]], completion_ids=[[5], [6, 7]], texts=["a", "b"],
                         truncated=[False, True], n=2)
    groups = Groups(samples=[], log_arrays={}, reward_names=["r"], num_tokens=0,
                    rounds=[GenerationRound(batch=batch, columns={"prompt": ["p"]}, total=np.asarray([1.0, 0.0]),
                                            per_fn={"r": np.asarray([1.0, float("nan")])}, arrays={},
                                            zero_std=np.zeros((1, 1), dtype=bool))], rank=0, n=2)
    path = tmp_path / "step_1.parquet"
    write_samples(SimpleNamespace(num_processes=1, is_main_process=True), path, groups.records(), step=1)
    df = pd.read_parquet(path)
    assert list(df["finish_reason"]) == ["stop", "length"] and list(df["turns"]) == [1, 1]
    assert df["reward_r"].tolist()[0] == 1.0 and df["reward_r"].isna().tolist() == [False, True]
