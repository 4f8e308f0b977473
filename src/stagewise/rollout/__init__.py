"""Generation backends. ``rollout.backend``: ``hf`` (transformers generate), ``vllm`` (colocated engine with
sleep mode and weight push), ``vllm_server`` (a separate ``vllm serve`` process over HTTP).

vLLM is imported only when a vLLM backend is built, so CPU installs never need it.
"""

from stagewise.rollout.base import (
    RolloutBatch,
    SamplingParams,
    check_sampling,
    decode_completions,
    left_pad,
    sampling_from_config,
    stop_token_ids,
)

BACKENDS = ("hf", "vllm", "vllm_server")


def build_rollout(cfg, model, tokenizer, *, accelerator=None, run_dir=None, return_logprobs: bool = False):
    """The backend named by ``cfg.rollout.backend``. ``model`` is the unwrapped policy (PEFT or plain)."""
    rollout = cfg.rollout
    sampling = sampling_from_config(rollout)
    if rollout.backend == "hf":
        from stagewise.rollout.hf import HFRollout

        zero3 = accelerator is not None and accelerator.state.deepspeed_plugin is not None and \
            cfg.hardware.deepspeed.zero_stage == 3
        return HFRollout(model, tokenizer, sampling, batch_size=rollout.batch_size, return_logprobs=return_logprobs,
                         gather_zero3=zero3)
    if rollout.backend == "vllm":
        from stagewise.rollout.vllm import VLLMColocated

        return VLLMColocated(cfg, model, tokenizer, sampling, accelerator=accelerator, run_dir=run_dir,
                             return_logprobs=return_logprobs)
    if rollout.backend == "vllm_server":
        from stagewise.rollout.vllm import VLLMServerClient

        return VLLMServerClient(cfg, model, tokenizer, sampling, accelerator=accelerator, run_dir=run_dir,
                                return_logprobs=return_logprobs)
    raise ValueError(f"rollout.backend={rollout.backend!r} is not one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "RolloutBatch", "SamplingParams", "build_rollout", "check_sampling", "decode_completions",
           "left_pad", "sampling_from_config", "stop_token_ids"]
