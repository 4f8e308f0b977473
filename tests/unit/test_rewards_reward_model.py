"""reward_model on the tiny Qwen3ForSequenceClassification saved to disk, and the r1_utility preset on it."""

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from stagewise.config import RewardConfig
from stagewise.models.loading import ModelNotFoundError
from stagewise.rewards import RewardRunner, build
from stagewise.rewards.reward_model import tiny_reward_model

PRESETS = Path(__file__).resolve().parents[2] / "conf" / "reward"
PROMPTS = ["What is 2+2?", "Name a prime number bigger than ten, please, and explain why it is prime.", "Hi",
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}], "Q"]
COMPLETIONS = ["4", "<think>11 has no divisors</think> 11", "Hello! How can I help you today?", "Paris", ""]


@pytest.fixture(scope="module")
def rm_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_rm")
    model, tok = tiny_reward_model(seed=0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def reference(rm_path):
    """The saved model, loaded independently, scoring one text at a time (no padding)."""
    model = AutoModelForSequenceClassification.from_pretrained(rm_path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(rm_path)

    def score(text, max_tokens=None):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        ids = ids[-max_tokens:] if max_tokens else ids
        with torch.inference_mode():
            return model(input_ids=torch.tensor([ids])).logits[0, 0].item()

    return score


def test_tiny_reward_model_shape():
    model, tok = tiny_reward_model()
    assert type(model).__name__ == "Qwen3ForSequenceClassification"
    assert model.config.num_labels == 1 and model.config.hidden_size == 192 and model.config.num_hidden_layers == 4
    assert model.score.weight.shape == (1, 192)
    assert model.config.pad_token_id == tok.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>")


def test_text_uses_the_chat_template(rm_path):
    rm = build("reward_model", model=rm_path)
    assert rm.text("What is 2+2?", "4") == \
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    assert rm.text([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}], "A") == \
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
    assert rm.text(None, "just this") == "just this"
    answer_only = build("reward_model", model=rm_path, answer_only=True)
    assert answer_only.text("q", "<think>long</think> 4") == \
        "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"


def test_batched_scores_equal_one_by_one_scores(rm_path, reference):
    rm = build("reward_model", model=rm_path, batch_size=2)  # 5 texts: 3 padded batches, sorted by length
    scores = rm(COMPLETIONS, prompt=PROMPTS, solution=["4", "11", "", "Paris", ""])
    expected = [reference(rm.text(p, c)) for p, c in zip(PROMPTS, COMPLETIONS)]
    assert scores == pytest.approx(expected, abs=1e-5)
    assert len({round(s, 4) for s in scores}) == 5  # a real model: the five texts score differently


def test_sigmoid_truncation_and_no_prompt(rm_path, reference):
    raw = build("reward_model", model=rm_path)(COMPLETIONS, prompt=PROMPTS)
    squashed = build("reward_model", model=rm_path, sigmoid=True)(COMPLETIONS, prompt=PROMPTS)
    assert squashed == pytest.approx([1 / (1 + math.exp(-r)) for r in raw], abs=1e-6)
    short = build("reward_model", model=rm_path, max_length=6)  # keeps the last 6 tokens (left truncation)
    text = short.text(PROMPTS[1], COMPLETIONS[1])
    assert short([COMPLETIONS[1]], prompt=[PROMPTS[1]]) == [pytest.approx(reference(text, 6), abs=1e-5)]
    bare = build("reward_model", model=rm_path)(["Paris"])
    assert bare == [pytest.approx(reference("Paris"), abs=1e-5)]


def test_missing_model_path_is_named(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no_such_rm"):
        build("reward_model", model=str(tmp_path / "no_such_rm"))


def test_r1_utility_preset_on_the_tiny_model(rm_path):
    cfg = OmegaConf.merge(OmegaConf.structured(RewardConfig), OmegaConf.load(PRESETS / "r1_utility.yaml"))
    cfg.functions[2].params.model = rm_path  # the documented overrides: reward.functions.2.params.model=...
    cfg.functions[3].params.model = rm_path
    cfg.num_workers = 1
    completions = ["<think>2 and 2</think><answer>\\boxed{4}</answer>", "no idea"]
    prompts = ["What is 2+2?", "What is 2+2?"]
    with RewardRunner(cfg) as runner:
        res = runner(completions, prompt=prompts, solution=["4", "4"])
    assert runner.names == ["accuracy", "format", "reward_model", "reward_model_2"]
    utility = build("reward_model", model=rm_path, sigmoid=True, answer_only=True)(completions, prompt=prompts)
    safety = build("reward_model", model=rm_path, sigmoid=True)(completions, prompt=prompts)
    assert res.per_fn["reward_model"] == pytest.approx(utility)
    assert res.per_fn["reward_model_2"] == pytest.approx(safety)
    assert utility[0] != pytest.approx(safety[0])  # answer_only really changes the scored text
    assert res.total == pytest.approx([0.2 + 0.2 + 0.3 * utility[0] + 0.3 * safety[0],
                                       0.3 * utility[1] + 0.3 * safety[1]])

