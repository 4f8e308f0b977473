"""``rollout=vllm`` on vLLM's real engine (its CPU build, which the README's test command installs on Linux x86_64):
tokens and log-probs equal the trainer's, weight pushes reach the engine (full weights, LoRA merged, LoRA adapter),
and a turn submitted as its own request gives what a batch generation gives."""

from __future__ import annotations

import copy
import platform
import sys

import pytest
import torch

from conftest import compose
from stagewise.config import ModelConfig
from stagewise.models import load_model_and_tokenizer
from stagewise.rollout import SamplingParams

if sys.platform == "linux" and platform.machine() == "x86_64":
    import vllm  # noqa: F401  (installed by the README's test command here: a missing engine is a failure, not a skip)
else:
    pytest.skip("vLLM's CPU build is published for Linux x86_64 only", allow_module_level=True)

PROMPTS = ["What is 2 + 3?", "Count the rows.", "<think>"]
TOLERANCE = 1e-4  # nats per token: vLLM's CPU kernels and torch's sdpa reduce in different orders


def trainer_logprobs(policy, prompt, completion) -> torch.Tensor:
    """Log-probs of ``completion`` after ``prompt`` under ``policy``, as the trainer computes them (temperature 1)."""
    ids = torch.tensor([list(prompt) + list(completion)])
    with torch.no_grad():
        logits = policy(ids).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


def max_logprob_gap(policy, batch) -> float:
    return max(float((trainer_logprobs(policy, p, c) - torch.tensor(lp)).abs().max())
               for p, c, lp in zip(batch.prompt_ids, batch.completion_ids, batch.logprobs))


def perturb(model, seed: int, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def build_engine(tmp_path, policy, tok, overrides=()):
    from stagewise.rollout.vllm import VLLMColocated

    cfg = compose(["stage=grpo", "data=tiny_grpo", "reward=countdown", "rollout=vllm", "rollout.max_new_tokens=16",
                   "rollout.cpu_kv_cache_gb=0.25", *overrides])
    return VLLMColocated(cfg, policy, tok, SamplingParams(n=4, max_new_tokens=16), run_dir=tmp_path,
                         return_logprobs=True)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """(engine, policy, tokenizer, prompt ids): an engine over the plain tiny policy."""
    policy, tok = load_model_and_tokenizer(ModelConfig())
    engine = build_engine(tmp_path_factory.mktemp("engine"), policy, tok)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    yield engine, policy, tok, prompts
    engine.close()


def test_greedy_tokens_equal_the_trainers(full):
    engine, policy, _, prompts = full
    batch = engine.generate(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=12, ignore_eos=True))
    for prompt, completion in zip(prompts, batch.completion_ids):
        hf = policy.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, min_new_tokens=12)
        assert completion == hf[0, len(prompt):].tolist()


def test_sampled_logprobs_equal_the_trainers(full):
    engine, policy, _, prompts = full
    batch = engine.generate(prompts)  # n=4, temperature 1: processed log-probs are the trainer's
    assert len(batch) == 12 and all(len(lp) == len(c) >= 1 for lp, c in zip(batch.logprobs, batch.completion_ids))
    assert max_logprob_gap(policy, batch) < TOLERANCE


def test_pushed_weights_reach_the_engine(full):
    engine, policy, _, prompts = full
    perturb(policy, seed=1)
    stale = engine.generate(prompts)  # not pushed yet: the engine still samples from the old weights
    assert max_logprob_gap(policy, stale) > 1e-2
    engine.sync_weights(policy)
    fresh = engine.generate(prompts)
    assert max_logprob_gap(policy, fresh) < TOLERANCE
    perturb(policy, seed=2)  # and again: every push lands, not only the first
    engine.sync_weights(policy)
    assert max_logprob_gap(policy, engine.generate(prompts)) < TOLERANCE


def test_lora_policy_is_pushed_merged_and_left_unmerged(full):
    from peft import LoraConfig, get_peft_model

    engine, policy, _, prompts = full
    lora = get_peft_model(copy.deepcopy(policy), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    perturb(lora, seed=3)  # LoRA B starts at zero: make the adapter matter (and move the base too)
    before = trainer_logprobs(lora, prompts[0], prompts[1])
    engine.sync_weights(lora)
    assert max_logprob_gap(lora, engine.generate(prompts)) < TOLERANCE
    after = trainer_logprobs(lora, prompts[0], prompts[1])  # unmerged again after the push (to rounding)
    assert torch.allclose(after, before, atol=1e-5)
    engine.sync_weights(policy)


def test_a_turn_submitted_as_its_own_request_equals_a_batch_generation(full):
    engine, _, _, prompts = full
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=10, ignore_eos=True)
    expected = engine.generate(prompts, greedy).completion_ids
    done = {}
    with engine.staying_awake():
        for k, prompt in enumerate(prompts):
            engine.submit_turn(prompt, greedy, lambda fut, k=k: done.__setitem__(k, fut.result()))
        steps = 0
        while engine.step():
            steps += 1
    assert [done[k].completion_ids[0] for k in range(len(prompts))] == expected
    assert steps >= 10  # one engine step per token, the three turns batched together


def test_multi_turn_trajectories_stream_through_the_engine_and_the_sandbox(full):
    """A policy scripted to write code after "?" and to answer at once after "!": the code runs in the real sandbox,
    its output comes back masked, and the next turn answers with it, each turn its own engine request."""
    from scripted_policy import chained_policy
    from stagewise.rollout.multiturn import MultiTurnRollout

    engine, policy, tok, _ = full
    obs_end = "\n</Execute>\n"
    scripted = chained_policy(tok, [["Run it?", "<Code>", "print(6*7)", "</Code>"],
                                    [obs_end, "<Answer>", "42", "</Answer>"], ["Say it!", "<Answer>"]])
    engine.sync_weights(scripted)
    cfg = compose(["stage=grpo", "env=code_sandbox", "rollout=vllm", "rollout.max_new_tokens=16",
                   "env.max_context_tokens=128"])
    agent = MultiTurnRollout.from_config(cfg, engine, tok)
    requests = engine._requests
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in ["Run it?", "Say it!"]]
    try:
        batch = agent.generate(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=16),
                               tasks=[{}, {}])
    finally:
        agent.pool.shutdown(wait=True)
        engine.sync_weights(policy)
    observation = "\n<Execute>\n42\n\n</Execute>\n"  # print's own newline, then the env's
    assert batch.texts[:2] == [f"<Code>print(6*7)</Code>{observation}<Answer>42</Answer>"] * 2
    assert batch.texts[2:] == ["<Answer>42</Answer>"] * 2
    assert list(batch.env_columns["turns"]) == [2, 2, 1, 1] and list(batch.env_columns["code_calls"]) == [1, 1, 0, 0]
    execute = tok(observation, add_special_tokens=False)["input_ids"]
    code = tok("<Code>print(6*7)</Code>", add_special_tokens=False)["input_ids"]
    assert list(batch.loss_mask[0]) == [1] * len(code) + [0] * len(execute) + [1] * (len(batch.loss_mask[0]) -
                                                                                      len(code) - len(execute))
    assert all(lp > -1e-3 for row, mask in zip(batch.logprobs, batch.loss_mask)
               for lp, m in zip(row, mask) if m)  # the policy's own tokens were scripted: probability ~1
    assert engine._requests - requests == 2 + 2  # a request per prompt for turn 0 (n=2 each), one per second turn
