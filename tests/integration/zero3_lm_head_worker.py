"""One rank of tests/integration/test_zero3_lm_head.py: ZeRO-3 on CPU, the LM head partitioned over 2 ranks. Runs the
log-prob step of SFT's loss (`head_logprobs` on the final hidden states, forward and backward) with a chunk size
that splits the tokens into many chunks, and once with one chunk for all of them (the control). Prints one JSON line
per chunk size into ``<out_dir>/rank<N>.jsonl``: head module calls, the largest tensor any op created, and how far the values and the head's full
gradient are from one process without DeepSpeed."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]
from stagewise.hydra_config import compose  # noqa: E402
from stagewise.models import load_model_and_tokenizer  # noqa: E402
from stagewise.training import build_accelerator, build_optimizer  # noqa: E402
from stagewise.training.modeling import final_hidden, head_logprobs  # noqa: E402

TOKENS = 600  # one sequence of 601 tokens: 600 predicted positions


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any aten op returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def main(out_dir: Path) -> None:
    from deepspeed.utils import safe_get_full_grad

    cfg = compose(["stage=sft", "hardware=cpu_2proc", "run_id=t"])
    acc = build_accelerator(cfg.hardware, 1.0, 1)
    model, _ = load_model_and_tokenizer(cfg.model)
    reference = copy.deepcopy(model)  # one process, no DeepSpeed
    engine, _ = acc.prepare(model, build_optimizer(model, cfg.stage))
    head = engine.module.get_output_embeddings()
    assert head.weight.numel() == 0 and hasattr(head.weight, "ds_id"), "the head is not partitioned by ZeRO-3"
    calls = []
    head.register_forward_pre_hook(lambda *_: calls.append(1))

    ids = torch.randint(10, 1000, (1, TOKENS + 1), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(1, TOKENS, dtype=torch.bool)
    mask[0, :50] = False  # a prompt: not trained, never projected
    targets = ids[:, 1:]

    ref_hidden = final_hidden(reference, ids)[:, :-1].detach().requires_grad_()
    ref_head = reference.get_output_embeddings()
    ref_lp, _ = head_logprobs(ref_head, ref_hidden, targets, 16, 1.0, mask=mask)
    (-(ref_lp * mask).sum()).backward()

    out = (out_dir / f"rank{acc.process_index}.jsonl").open("w")
    for chunk in (16, 10_000):
        engine.zero_grad()
        with torch.no_grad():
            hidden = final_hidden(engine, ids)[:, :-1]
        hidden = hidden.detach().requires_grad_()
        calls.clear()
        with LargestTensor() as largest:
            lp, _ = head_logprobs(head, hidden, targets, chunk, 1.0, mask=mask)
            engine.backward(-(lp * mask).sum())
        grad = safe_get_full_grad(head.weight)
        out.write(json.dumps({
            "rank": acc.process_index, "chunk": chunk, "head_calls": len(calls), "largest": largest.numel,
            "tokens": int(mask.sum()), "vocab": int(head.weight.ds_shape[0]), "hidden": int(head.weight.ds_shape[1]),
            "lp_diff": float((lp - ref_lp).abs().max()),
            "grad_diff": float((grad - ref_head.weight.grad).abs().max()),
            "grad_norm": float(ref_head.weight.grad.norm()),
            "hidden_grad_diff": float((hidden.grad - ref_hidden.grad).abs().max())}) + "\n")
    out.close()
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
