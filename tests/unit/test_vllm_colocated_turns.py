"""The colocated vLLM engine across the turns of a multi-turn batch: it wakes once, keeps its weights and prefix cache
over the turns and sleeps when the batch ends; weights are pushed only by `sync_weights` (after an optimizer step) or
at the first turn, never between turns. Sleep mode is GPU-only (vLLM's CPU worker ignores it), so ``vllm.LLM`` is a
recording stand-in here, with CUDA reported present; the engine wrapper (`VLLMColocated`), the multi-turn loop and
the code sandbox that runs the turns' code are the real ones. The real engine's turns are tested on its CPU build
(tests/integration/test_vllm_engine.py, test_zero3_vllm_turns.py)."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest

from conftest import compose
from stagewise.hydra_config import typed_config
from stagewise.rollout import SamplingParams
from stagewise.rollout.multiturn import MultiTurnRollout
from stagewise.rollout.vllm import VLLMColocated

CODE_TURN = "<Analyze>\nCompute it.\n</Analyze>\n<Code>\nprint(6 * 7)\n</Code>"
ANSWER_TURN = "<Answer>\n42</Answer>"


class RecordingLLM:
    """``vllm.LLM``'s surface that `VLLMColocated` uses, recording every call. A prompt whose index is even first
    writes code (two turns), an odd one answers at once (one turn); a prompt that already holds an ``<Execute>``
    observation answers."""

    tokenizer = None  # set by the test

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.events: list[tuple] = []
        self.loaded = 0
        self.queued: list[tuple] = []  # (request id, prompt, params) added and not yet stepped
        self.llm_engine = SimpleNamespace(add_request=self._add_request, step=self._step, engine_core=None)

    def _load_weights(self, weights):
        self.loaded += len(weights)
        self.events.append(("load_weights",))

    def collective_rpc(self, method, kwargs):
        assert method == "reload_weights" and kwargs["is_checkpoint_format"]
        self._load_weights(list(kwargs["weights_iterator"]))

    def sleep(self, level):
        self.events.append(("sleep", level))

    def wake_up(self, tags):
        self.events.append(("wake_up", tuple(tags)))

    def reset_prefix_cache(self):
        self.events.append(("reset_prefix_cache",))

    def generate(self, prompts, sampling_params, use_tqdm, lora_request):
        self.events.append(("generate", len(prompts)))
        return [SimpleNamespace(outputs=self.complete(p["prompt_token_ids"], sampling_params.n)) for p in prompts]

    def _add_request(self, request_id, prompt, params, lora_request=None):
        """``LLMEngine.add_request``; the engine answers every queued request at its next ``step``."""
        assert params.output_kind == "FINAL_ONLY"
        self.events.append(("add_request", params.n))
        self.queued.append((request_id, prompt, params))

    def _step(self):
        queued, self.queued = self.queued, []
        return [SimpleNamespace(request_id=rid, finished=True, outputs=self.complete(p["prompt_token_ids"], sp.n))
                for rid, p, sp in queued]

    def complete(self, ids, n):
        tok = self.tokenizer
        execute = tok.convert_tokens_to_ids("<Execute>")
        text = ANSWER_TURN if execute in ids or self.first_turn_index(ids) % 2 else CODE_TURN
        completion = tok(text, add_special_tokens=False)["input_ids"]
        return [SimpleNamespace(token_ids=completion, finish_reason="stop", logprobs=None) for _ in range(n)]

    def first_turn_index(self, ids) -> int:
        """Which test prompt this is: the digit its question ends with."""
        text = self.tokenizer.decode(ids)
        return int(text.split("question ")[1][0])


def fake_vllm_module() -> types.ModuleType:
    """``vllm`` with `RecordingLLM` as its ``LLM`` and the names `VLLMColocated` imports."""
    module = types.ModuleType("vllm")
    module.LLM = RecordingLLM
    module.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    module.sampling_params = types.ModuleType("vllm.sampling_params")
    module.sampling_params.RequestOutputKind = SimpleNamespace(FINAL_ONLY="FINAL_ONLY")
    return module


@pytest.fixture
def fake_vllm(monkeypatch):
    module = fake_vllm_module()
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", module.sampling_params)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    return module


def test_one_wake_per_multi_turn_batch_and_no_weight_push_between_turns(fake_vllm, tiny, tmp_path):
    model, tok = tiny
    RecordingLLM.tokenizer = tok
    cfg = typed_config(compose(["stage=grpo", "rollout=vllm", "env=code_sandbox", "env.max_turns=4",
                                "rollout.max_new_tokens=64", "run_id=t"]))
    sampling = SamplingParams(n=1, temperature=1.0, max_new_tokens=64)
    engine = VLLMColocated(cfg, model, tok, sampling, run_dir=tmp_path, return_logprobs=False)
    llm = engine.llm
    params = sum(1 for _ in model.named_parameters())
    assert llm.events == [("sleep", 2)]  # created asleep: the GPU belongs to training

    engine.sync_weights(model)  # after an optimizer step
    assert llm.events[1:] == [("wake_up", ("weights",)), ("load_weights",), ("reset_prefix_cache",)]
    assert llm.loaded == params

    prompts = [tok(f"question {k}?", add_special_tokens=False)["input_ids"] for k in range(4)]
    before = len(llm.events)
    engine.generate([prompts[1]], sampling)  # one generation on its own (evaluation): asleep again right after
    assert llm.events[before:] == [("wake_up", ("kv_cache",)), ("generate", 1), ("sleep", 2)]

    # a multi-turn batch: the level-2 sleep dropped the weights, so the first turn (which every rank runs) pushes
    # them; then one wake of the KV cache, each trajectory's turn its own request to the engine (4 first turns,
    # then the 2 that ran code, each added when its code run returned) and one sleep at the end: no weight push
    # and no prefix-cache reset between the turns
    agent = MultiTurnRollout.from_config(cfg, engine, tok)
    before = len(llm.events)
    try:
        batch = agent.generate(prompts, sampling, tasks=[{} for _ in prompts])
    finally:
        agent.close()
    turns = [int(t) for t in batch.env_columns["turns"]]
    assert turns == [2, 1, 2, 1]  # uneven: the code-writing trajectories take a second turn
    assert llm.events[before:] == [("wake_up", ("weights",)), ("load_weights",), ("reset_prefix_cache",),
                                   ("wake_up", ("kv_cache",)), *[("add_request", 1)] * 6, ("sleep", 2)]
    assert llm.loaded == 2 * params
    assert "<Execute>\n42\n" in tok.decode(batch.completion_ids[0])  # the sandbox really ran the code
