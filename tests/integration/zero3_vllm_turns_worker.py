"""One rank of tests/integration/test_zero3_vllm_turns.py: ZeRO-3 on CPU, a real colocated vLLM engine per rank
(vLLM's CPU build), two GRPO-like steps (weight push, then a multi-turn batch in the code sandbox) where rank 0's
trajectories all run code (two turns each) and rank 1's all answer at once (one turn). The policy is scripted
(`chained_policy`), so the turn counts are known. Prints one JSON line: this rank's turns, pushes and how far the
engine's log-probs are from the trainer's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]
from scripted_policy import chained_policy  # noqa: E402

from stagewise.hydra_config import compose  # noqa: E402
from stagewise.models import load_model_and_tokenizer  # noqa: E402
from stagewise.rollout import SamplingParams, build_generator  # noqa: E402
from stagewise.training import build_accelerator, build_optimizer  # noqa: E402


def main(run_dir: Path) -> None:
    cfg = compose(["stage=grpo", "hardware=cpu_2proc", "rollout=vllm", "env=code_sandbox", "env.max_turns=4",
                   "rollout.max_new_tokens=16", "rollout.cpu_kv_cache_gb=0.25", "run_id=t"])
    acc = build_accelerator(cfg.hardware, 1.0, 1)
    _, tok = load_model_and_tokenizer(cfg.model)
    model = chained_policy(tok, [["Run it?", "<Code>", "print(6*7)", "</Code>"],
                                 ["\n</Execute>\n", "<Answer>", "42", "</Answer>"], ["Say it!", "<Answer>"]])
    engine, optimizer = acc.prepare(model, build_optimizer(model, cfg.stage))
    policy = engine.module
    assert any(hasattr(p, "ds_id") for p in policy.parameters()), "not partitioned by ZeRO-3"

    agent = build_generator(cfg, policy, tok, accelerator=acc, run_dir=run_dir, return_logprobs=True)
    backend = agent.backend
    assert backend.zero3
    prompt = "Run it?" if acc.process_index == 0 else "Say it!"
    prompts = [tok(prompt, add_special_tokens=False)["input_ids"]] * 2
    turns, worst = [], []
    sampling = SamplingParams(n=2, temperature=1.0, max_new_tokens=16)
    try:
        for _ in range(2):
            with torch.no_grad():  # an optimizer step that changes no token's successor: a bias on every logit
                with __import__("deepspeed").zero.GatheredParameters([policy.lm_head.weight], modifier_rank=0):
                    policy.lm_head.weight.mul_(1.1)
            agent.sync_weights(policy)  # after the step's optimizer update
            with agent.staying_awake():
                batch = agent.generate(prompts, sampling, tasks=[{}, {}])
            turns.append(sorted({int(t) for t in batch.env_columns["turns"]}))
            worst.append(max(-lp for row, mask in zip(batch.logprobs, batch.loss_mask) for lp, m in zip(row, mask) if m))
    finally:
        agent.close()
    print(json.dumps({"rank": acc.process_index, "turns": turns, "pushes": backend.weight_pushes,
                      "worst_logprob": max(worst), "texts": batch.texts}), flush=True)
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
