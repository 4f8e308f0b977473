"""Model setup for training: LoRA via PEFT, gradient checkpointing, Liger kernels when available on a GPU."""

from __future__ import annotations

import importlib.util
import logging

import torch
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def apply_liger(model) -> bool:
    """Patch the model with Liger kernels (fused RMSNorm/SwiGLU/RoPE) when liger-kernel and a GPU are present."""
    if not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None:
        return False
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, fused_linear_cross_entropy=False, cross_entropy=False)
    log.info("Liger kernels applied")
    return True


def prepare_model(model, cfg: DictConfig):
    """LoRA (model.lora.enabled), gradient checkpointing (hardware.gradient_checkpointing), Liger (hardware.use_liger)."""
    if cfg.hardware.use_liger:
        apply_liger(model)
    if cfg.hardware.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    lora = cfg.model.lora
    if lora.enabled:
        from peft import LoraConfig, get_peft_model

        if cfg.hardware.gradient_checkpointing:
            model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        log.info("LoRA r=%d alpha=%d: %.2fM of %.2fM params trainable", lora.r, lora.alpha, trainable / 1e6,
                 total / 1e6)
    return model


def sequence_token_logprobs(model, input_ids: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                            attention_mask: torch.Tensor | None = None, chunk_size: int = 1024,
                            temperature: float = 1.0, with_entropy: bool = False):
    """``log p(x_{t+1} | x_<=t)`` for every position, shape [B, T-1] (and the entropy if asked), without ever
    materialising full-vocabulary logits for the whole batch.

    The wrapped model's own forward is called (so DDP/DeepSpeed/PEFT hooks run) with ``logits_to_keep`` set to a
    single position; the final-norm hidden state comes back in ``hidden_states[-1]`` and is projected through
    the lm_head chunk by chunk in ``chunked_token_logprobs``.
    """
    from stagewise.algorithms import chunked_token_logprobs

    keep = torch.tensor([input_ids.shape[1] - 1], device=input_ids.device)
    out = model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                output_hidden_states=True, logits_to_keep=keep, use_cache=False)
    hidden = out.hidden_states[-1][:, :-1]
    inner = model.module if hasattr(model, "module") else model
    head = inner.get_output_embeddings()
    return chunked_token_logprobs(hidden, lm_head_for_chunks(head), input_ids[:, 1:], chunk_size,
                                  temperature=temperature, with_entropy=with_entropy)


def lm_head_for_chunks(head):
    """The head's weight, or the head module itself when ZeRO-3 partitions the weight (its hooks gather it)."""
    return head if hasattr(head.weight, "ds_id") else head.weight
