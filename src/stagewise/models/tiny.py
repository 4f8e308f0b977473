"""The offline tiny model: a Qwen3-architecture causal LM of a few million parameters, built from a config.

``model.name_or_path: stagewise-tiny`` selects it. Weights come from ``torch.manual_seed(model.tiny.seed)``, so the
same config gives the same model on every machine; the tokenizer is the byte-level BPE in ``assets/``. Like
Qwen3-8B (the DeepAnalyze base), the lm_head is untied and the embedding matrix is padded past the tokenizer
length, so the vocabulary stage meets the same shapes as on the real model.
"""

from __future__ import annotations

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen3Config, Qwen3ForCausalLM

from stagewise.config import DEEPANALYZE_TAGS, TinyModelConfig
from stagewise.models.tiny_tokenizer import ASSET_DIR

TINY_NAME = "stagewise-tiny"


def tiny_tokenizer(with_deepanalyze_tags: bool = True) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(str(ASSET_DIR))
    if with_deepanalyze_tags:
        tok.add_tokens(DEEPANALYZE_TAGS)
    return tok


def padded_vocab_size(n_tokens: int, multiple: int) -> int:
    return n_tokens if multiple <= 1 else -(-n_tokens // multiple) * multiple


def build_tiny(cfg: TinyModelConfig, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    tok = tiny_tokenizer(cfg.with_deepanalyze_tags)
    config = Qwen3Config(
        vocab_size=padded_vocab_size(len(tok), cfg.pad_vocab_to_multiple_of),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        rope_theta=10000.0,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.to(dtype), tok
