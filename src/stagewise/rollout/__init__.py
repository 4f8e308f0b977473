"""Generation backends. ``rollout.backend``: ``hf`` (transformers generate), ``vllm`` (colocated engine with
sleep mode and weight push), ``vllm_server`` (a separate ``vllm serve`` process over HTTP).

Each backend, and the multi-turn loop around one, is a `Generator`. vLLM is imported only when a vLLM backend is
built, so CPU installs never need it.
"""

from stagewise.rollout.base import (
    Generator,
    RolloutBatch,
    RolloutTiming,
    SamplingParams,
    check_sampling,
    decode_completions,
    left_pad,
    sampling_from_config,
    stop_token_ids,
)

BACKENDS = ("hf", "vllm", "vllm_server")


def build_rollout(cfg, model, tokenizer, *, accelerator=None, run_dir=None, return_logprobs: bool = False
                  ) -> Generator:
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


# ============================================================================================ the generator
# What GRPO, evaluation (in-loop and ``stage=eval``) and rejection sampling generate with: the backend, wrapped in
# the multi-turn agent loop when ``env.name`` is not ``single_turn`` (`stagewise.rollout.multiturn`).
def build_generator(cfg, policy, tokenizer, *, accelerator=None, run_dir=None, return_logprobs: bool = False
                    ) -> Generator:
    """The ``rollout.backend`` for ``policy``; wrapped in the multi-turn agent loop when ``env.name`` is not
    ``single_turn``. ``return_logprobs``: the engine's log-probs of the sampled tokens (GRPO's TIS)."""
    backend = build_rollout(cfg, policy, tokenizer, accelerator=accelerator, run_dir=run_dir,
                            return_logprobs=return_logprobs)
    if cfg.env.name == "single_turn":
        return backend
    from stagewise.rollout.multiturn import MultiTurnRollout

    return MultiTurnRollout.from_config(cfg, backend, tokenizer)


def is_multi_turn(generator: Generator) -> bool:
    from stagewise.rollout.multiturn import MultiTurnRollout

    return isinstance(generator, MultiTurnRollout)


def generate(generator: Generator, columns, sampling: SamplingParams | None = None) -> RolloutBatch:
    """One ``generate`` call for a batch of dataset rows (``columns``: column -> values, with ``prompt_ids``); the
    agent loop also gets the rows as its tasks (workspaces, reward specs). ``sampling`` None: the generator's own
    (``rollout.*``)."""
    if is_multi_turn(generator):
        tasks = {k: v for k, v in columns.items() if k != "prompt_ids"}
        return generator.generate(columns["prompt_ids"], sampling, tasks=tasks)
    return generator.generate(columns["prompt_ids"], sampling)


def reward_columns(columns, batch: RolloutBatch) -> dict:
    """What the rewards get besides the texts: the dataset columns repeated ``n`` times (one value per completion),
    the completion facts (``completion_ids``, ``completion_lengths``, ``truncated``) and, from the agent loop, each
    trajectory's ``turns``, ``code_calls`` ..."""
    n = batch.n
    cols = {k: [v for v in values for _ in range(n)] for k, values in columns.items() if k != "prompt_ids"}
    cols["completion_ids"] = batch.completion_ids
    cols["completion_lengths"] = [len(c) for c in batch.completion_ids]
    cols["truncated"] = batch.truncated
    cols.update(batch.env_columns)
    return cols


__all__ = ["BACKENDS", "Generator", "RolloutBatch", "RolloutTiming", "SamplingParams", "build_generator",
           "build_rollout", "check_sampling", "decode_completions", "generate", "is_multi_turn", "left_pad",
           "reward_columns", "sampling_from_config", "stop_token_ids"]
