"""`evaluate_prompts` drives the multi-turn agent loop (env=code_sandbox): a scripted backend writes code, the
sandbox runs it, and the reward sees the whole trajectory with its Execute span and the loop's `turns` column."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
from datasets import Dataset

from stagewise.config import EnvConfig
from stagewise.envs import build_env
from stagewise.evaluation import EvalSpec, evaluate_prompts
from stagewise.rollout import is_multi_turn
from stagewise.rewards import RewardRunner
from stagewise.rollout import RolloutBatch
from stagewise.rollout.multiturn import STOP_TAGS, MultiTurnRollout

TURNS = ["<Analyze>add them</Analyze><Code>print(40 + 2)</Code>", "<Answer>42</Answer>"]

REWARD = '''
def executed_42(completions, turns, **columns):
    """1 when the sandbox's output (42) is in the trajectory and the loop took two turns."""
    return [float("<Execute>\\n42\\n\\n</Execute>" in c and t == 2) for c, t in zip(completions, turns)]
'''


class ScriptedBackend:
    """Answers turn k of every trajectory with TURNS[k] (the stop tag is the last token, as a real backend's is)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.stop_ids = [tokenizer.eos_token_id]
        self.calls = 0

    def generate(self, prompts, sampling):
        text = TURNS[min(self.calls, len(TURNS) - 1)]
        self.calls += 1
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        rows = len(prompts) * sampling.n
        return RolloutBatch(prompt_ids=[list(p) for p in prompts for _ in range(sampling.n)],
                            completion_ids=[ids] * rows, texts=[text] * rows, truncated=[False] * rows, n=sampling.n)

    def sync_weights(self, *a, **k):
        pass

    def staying_awake(self):
        return contextlib.nullcontext()

    def close(self):
        pass


def test_multi_turn_trajectories_are_generated_scored_and_counted(tiny, tmp_path):
    _, tok = tiny
    env_cfg = EnvConfig(name="code_sandbox", max_turns=5, timeout_s=20.0, num_workers=2)
    agent = MultiTurnRollout(ScriptedBackend(tok), tok, lambda: build_env(env_cfg), max_context_tokens=2048,
                             stop_tags=STOP_TAGS["code_sandbox"], num_workers=2)
    assert is_multi_turn(agent) and not is_multi_turn(ScriptedBackend(tok))
    prompts = Dataset.from_dict({"prompt_ids": [tok.encode("What is 40 + 2?")] * 2, "source": ["q", "q"],
                                 "answer": ["42", "42"]})
    (tmp_path / "reward.py").write_text(REWARD)
    rewards = RewardRunner({"functions": [{"name": f"{tmp_path}/reward.py:executed_42"}]})
    acc = SimpleNamespace(num_processes=1, process_index=0, is_main_process=True)
    try:
        metrics, results = evaluate_prompts(acc, agent, prompts, rewards, EvalSpec(max_new_tokens=64),
                                            keep_texts=True, show_progress=False)
    finally:
        agent.close()
        rewards.close()
    assert [r.turns for r in results] == [[2], [2]]
    assert "<Execute>\n42\n\n</Execute>" in results[0].texts[0] and results[0].texts[0].endswith("</Answer>")
    assert metrics["eval/accuracy"] == pytest.approx(1.0) and metrics["eval/turns/mean"] == pytest.approx(2.0)
    assert metrics["eval/num_prompts"] == 2
