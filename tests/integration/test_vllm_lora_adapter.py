"""``rollout.lora_sync=adapter`` on vLLM's real engine (its CPU build): each pushed adapter is saved and served
through vLLM's own LoRA support, and the engine samples with the newest. In a module of its own: vLLM's parallel
state is process-wide, so two engines must not be alive in one process at once (test_vllm_engine.py holds one)."""

from __future__ import annotations

import torch
from test_vllm_engine import PROMPTS, TOLERANCE, build_engine, max_logprob_gap  # also: skip where no vLLM build

from stagewise.config import ModelConfig
from stagewise.models import load_model_and_tokenizer


def test_lora_adapter_mode_serves_each_new_adapter(tmp_path):
    from peft import LoraConfig, get_peft_model

    base, tok = load_model_and_tokenizer(ModelConfig())
    policy = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    engine = build_engine(tmp_path, policy, tok, ["rollout.lora_sync=adapter", "model.lora.r=8"])
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    try:
        for seed in (4, 5):  # two adapters in turn: the engine serves the newest
            with torch.no_grad():
                for name, p in policy.named_parameters():
                    if "lora_" in name:
                        p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.2)
            engine.sync_weights(policy)
            assert (tmp_path / "rollout_adapters" / f"v{seed - 3}" / "adapter_model.safetensors").is_file()
            assert max_logprob_gap(policy, engine.generate(prompts)) < TOLERANCE
    finally:
        engine.close()
