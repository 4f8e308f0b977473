"""Load any HF causal LM (hub id or local path) or the offline tiny model, with dtype and attention options."""

from __future__ import annotations

import copy
import importlib.util
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from stagewise.config import ModelConfig
from stagewise.models.attention import NAME as SDPA_VARLEN
from stagewise.models.attention import register as register_sdpa_varlen
from stagewise.models.tiny import TINY_NAME, build_tiny

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


class ModelNotFoundError(FileNotFoundError):
    pass


def resolve_dtype(name: str) -> torch.dtype:
    """``auto`` is bf16 on a GPU that supports it and fp32 on CPU (bf16 matmuls on CPU are slow and inexact)."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"model.dtype={name!r} is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def resolve_attn_implementation(name: str) -> str:
    """``auto`` is ``sdpa_varlen``: transformers' sdpa for ordinary forwards and generation, and packed rows (SFT,
    GRPO's token budget, shared prompts) one document at a time, through flash-attention's varlen kernel on a GPU
    where flash-attn is installed (`stagewise.models.attention`). ``flash_attention_2`` stays available by name
    (packed rows then carry each sample's prompt: transformers' flash path has no shared-prefix layout)."""
    register_sdpa_varlen()
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ImportError("model.attn_implementation=flash_attention_2 needs flash-attn: pip install 'stagewise[gpu]'")
    return SDPA_VARLEN if name == "auto" else name


def _looks_like_path(name: str) -> bool:
    """Hub ids are exactly ``org/name``; anything else (``./x``, ``/abs``, ``a/b/c``, ``ckpt``) is a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") != 1


def check_model_path(name: str) -> None:
    """A local-looking path that does not exist is an error naming it (not a confusing hub 404)."""
    if name == TINY_NAME:
        return
    p = Path(name).expanduser()
    if p.exists():
        if p.is_dir() and not (p / "config.json").exists():
            raise ModelNotFoundError(f"model path {str(p)!r} exists but has no config.json (is it an HF model folder?)")
        return
    if _looks_like_path(name):
        raise ModelNotFoundError(f"model path {name!r} does not exist")
    check_hub_model(name)


def check_hub_model(name: str, revision: str | None = None, timeout_s: float = 3.0) -> None:
    """A hub id that is not in the local cache needs the hub: offline (``HF_HUB_OFFLINE``) or with the hub out of
    reach, fail at once in one line naming the model (the hub client would retry for a minute first)."""
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
        return
    how = (f"download it where there is network (`huggingface-cli download {name}`, then copy the cache) or set "
           f"model.name_or_path to a local copy")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ModelNotFoundError(f"model {name!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: {how}")
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or (443 if endpoint.scheme == "https" else 80)),
                                 timeout=timeout_s).close()
    except OSError as e:
        raise ModelNotFoundError(f"model {name!r} is not in the Hugging Face cache and the hub "
                                 f"({endpoint.geturl()}) cannot be reached ({e}): {how}") from None


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    if cfg.name_or_path == TINY_NAME and cfg.tokenizer is None:
        from stagewise.models.tiny import tiny_tokenizer

        tok = tiny_tokenizer(cfg.tiny.with_deepanalyze_tags)
    else:
        name = cfg.tokenizer or cfg.name_or_path
        check_model_path(name)
        tok = AutoTokenizer.from_pretrained(name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    if cfg.chat_template:
        tpl = cfg.chat_template
        tok.chat_template = Path(tpl).read_text() if tpl.endswith(".jinja") else tpl
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model_and_tokenizer(cfg: ModelConfig, dtype: torch.dtype | None = None):
    """Return ``(model, tokenizer)``. The model is on CPU; the stage moves it (Accelerate does)."""
    dtype = dtype or resolve_dtype(cfg.dtype)
    attn = resolve_attn_implementation(cfg.attn_implementation)
    if cfg.name_or_path == TINY_NAME:
        model, tok = build_tiny(cfg.tiny, dtype=dtype, attn_implementation=attn)
        if cfg.chat_template:
            tok = load_tokenizer(cfg)
        return model, tok
    check_model_path(cfg.name_or_path)
    tok = load_tokenizer(cfg)
    model = AutoModelForCausalLM.from_pretrained(
        cfg.name_or_path,
        revision=cfg.revision,
        dtype=dtype,
        attn_implementation=attn,
        trust_remote_code=cfg.trust_remote_code,
    )
    log.info("loaded %s (%.1fM params, %s, attn=%s)", cfg.name_or_path, num_params(model) / 1e6, dtype, attn)
    return model, tok


def num_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Parameters of the whole model, also under ZeRO-3 (where each rank holds a shard: ``ds_numel`` is the full
    size; ``numel()`` is 0)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad or not trainable_only)


def frozen_copy(model):
    """The KL reference for full fine-tuning: a frozen copy of the initial policy, in eval mode."""
    ref = copy.deepcopy(model)
    ref.eval()
    ref.requires_grad_(False)
    return ref
