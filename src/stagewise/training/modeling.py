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
