"""One rank of tests/integration/test_zero3_vllm_turns.py: ZeRO-3 on CPU, the colocated vLLM wrapper over a recording
stand-in engine, two GRPO-like steps (weight sync, then a multi-turn batch) where rank 0's trajectories all run code
(two turns each) and rank 1's all answer at once (one turn). Prints one JSON line: the weights this rank pushed."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "unit"), str(Path(__file__).resolve().parents[1])]
from test_vllm_colocated_turns import RecordingLLM, fake_vllm_module  # noqa: E402

from stagewise.config import compose  # noqa: E402
from stagewise.models import load_model_and_tokenizer  # noqa: E402
from stagewise.rollout import SamplingParams  # noqa: E402
from stagewise.rollout.multiturn import MultiTurnRollout  # noqa: E402
from stagewise.training import build_accelerator, build_optimizer  # noqa: E402


def main(run_dir: Path) -> None:
    cfg = compose(["stage=grpo", "hardware=cpu_2proc", "rollout=vllm", "env=code_sandbox", "env.max_turns=4",
                   "rollout.max_new_tokens=64", "run_id=t"])
    acc = build_accelerator(cfg.hardware, 1.0, 1)
    model, tok = load_model_and_tokenizer(cfg.model)
    engine, _ = acc.prepare(model, build_optimizer(model, cfg.stage))
    policy = engine.module
    assert any(hasattr(p, "ds_id") for p in policy.parameters()), "not partitioned by ZeRO-3"

    module = fake_vllm_module()
    sys.modules["vllm"], sys.modules["vllm.sampling_params"] = module, module.sampling_params
    torch.cuda.is_available = lambda: True  # VLLMColocated's guard; nothing here touches CUDA
    RecordingLLM.tokenizer = tok
    from stagewise.rollout.vllm import VLLMColocated

    sampling = SamplingParams(n=1, temperature=1.0, max_new_tokens=64)
    engine_cfg = replace(cfg, model=replace(cfg.model, name_or_path="recorded/engine"))  # nothing to save or load
    backend = VLLMColocated(engine_cfg, policy, tok, sampling, accelerator=acc, run_dir=run_dir, return_logprobs=False)
    assert backend.zero3
    agent = MultiTurnRollout.from_config(engine_cfg, backend, tok)
    first = [0, 2, 4] if acc.process_index == 0 else [1, 3, 5]  # even: code then answer; odd: answer
    prompts = [tok(f"question {k}?", add_special_tokens=False)["input_ids"] for k in first]
    turns = []
    try:
        for _ in range(2):
            backend.sync_weights(policy)  # after the step's optimizer update
            batch = agent.generate(prompts, sampling, tasks=[{} for _ in prompts])
            turns.append(sorted({int(t) for t in batch.env_columns["turns"]}))
        loaded = backend.llm.loaded
    finally:
        agent.close()
    params = sum(1 for _ in policy.named_parameters())
    print(json.dumps({"rank": acc.process_index, "turns": turns, "loaded": loaded, "params": params}), flush=True)
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
