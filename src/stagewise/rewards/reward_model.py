"""A learned reward: any HF sequence-classification checkpoint with one label scores prompt + completion.

The text scored is the tokenizer's chat template applied to the prompt messages (a string prompt becomes one user
message) plus the completion as the assistant turn; a tokenizer without a chat template gets the prompt text and the
completion concatenated; with no ``prompt`` column the completion alone is scored. Inputs are sorted by length and
scored ``batch_size`` at a time, right-padded, truncated from the *left* to ``max_length`` tokens so that the end of
the completion (what the head reads) is never cut. Loaded models are cached per process, so two rewards on the same
checkpoint share one copy.

``tiny_reward_model`` builds the offline tiny model's sequence-classification twin (tests, demos).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from stagewise.rewards.base import BatchReward, prompt_text, rows_of

_CACHE: Dict[Tuple[str, str, str], Tuple[Any, Any]] = {}


def _device(name: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def load_reward_model(path: str, device: str = "auto", dtype: str = "auto"):
    """(model, tokenizer) for a local folder or hub id, cached; a missing local path is an error naming it."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from stagewise.models.loading import check_model_path, resolve_dtype

    key = (str(path), _device(device), dtype)
    if key not in _CACHE:
        check_model_path(str(path))
        tok = AutoTokenizer.from_pretrained(str(path))
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.padding_side, tok.truncation_side = "right", "left"
        model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=resolve_dtype(dtype))
        if model.config.num_labels != 1:
            raise ValueError(f"reward model {path!r} has num_labels={model.config.num_labels}; a reward model "
                             "needs exactly one output")
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id
        _CACHE[key] = (model.to(key[1]).eval(), tok)
    return _CACHE[key]


class RewardModel(BatchReward):
    """Scalar score from a sequence-classification reward model (the logit; ``sigmoid: true`` maps it to (0, 1),
    handy when mixing with 0/1 rule rewards). ``answer_only: true`` scores only the text after ``</think>`` (R1
    judged helpfulness on the final summary, harmlessness on the whole response). No timeout: the cost of a
    forward pass is predictable; an exception fails the batch and the runner then retries sample by sample."""

    def __init__(self, model: str, batch_size: int = 8, max_length: int = 2048, device: str = "auto",
                 dtype: str = "auto", sigmoid: bool = False, answer_only: bool = False):
        if batch_size < 1:
            raise ValueError(f"reward_model: batch_size must be >= 1, got {batch_size}")
        self.model_path = str(model)
        self.model, self.tokenizer = load_reward_model(self.model_path, device, dtype)
        self.batch_size, self.max_length = int(batch_size), int(max_length)
        self.sigmoid, self.answer_only = bool(sigmoid), bool(answer_only)

    def text(self, prompt: Any, completion: str) -> str:
        if self.answer_only and "</think>" in completion:
            completion = completion.split("</think>", 1)[1].strip()
        if prompt is None:
            return completion
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
            messages.append({"role": "assistant", "content": completion})
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return prompt_text(prompt) + completion

    def __call__(self, completions: Sequence[str], **columns: Sequence[Any]) -> List[Optional[float]]:
        import torch

        rows = rows_of(completions, columns)
        texts = [self.text(row.get("prompt"), c) for c, row in zip(completions, rows)]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        scores: List[Optional[float]] = [None] * len(texts)
        device = next(self.model.parameters()).device
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt", add_special_tokens=False).to(device)
            with torch.inference_mode():
                logits = self.model(**enc).logits[:, 0].float()
            if self.sigmoid:
                logits = torch.sigmoid(logits)
            for i, value in zip(idx, logits.tolist()):
                scores[i] = float(value)
        return scores


def tiny_reward_model(seed: int = 0):
    """(model, tokenizer): ``Qwen3ForSequenceClassification`` with ``num_labels=1`` and the exact config of
    ``stagewise.models.build_tiny``, seeded, with the shipped tiny tokenizer."""
    import torch
    from transformers import Qwen3ForSequenceClassification

    from stagewise.config import TinyModelConfig
    from stagewise.models import build_tiny

    causal, tok = build_tiny(TinyModelConfig(seed=seed))
    config = causal.config
    config.num_labels = 1
    config.pad_token_id = tok.pad_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForSequenceClassification(config)
    return model.eval(), tok
