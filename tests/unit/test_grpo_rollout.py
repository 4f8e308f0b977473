"""Rollout backends: sampling checks, the HF backend's shapes, stop strings, stop token ids, engine log-probs, and
the vLLM backends' lazy import."""

import importlib
import subprocess
import sys

import pytest
import torch

from stagewise.rollout import (Generator, RolloutBatch, RolloutTiming, SamplingParams, build_generator,
                               check_sampling, decode_completions, left_pad)
from stagewise.rollout.hf import HFRollout

from conftest import compose


# ------------------------------------------------------------------------------------------------ sampling checks
@pytest.mark.parametrize("n", [2, 8])
def test_temperature_zero_with_a_group_is_refused(n):
    with pytest.raises(ValueError, match=rf"rollout.temperature=0 \(greedy\) with rollout.n={n}"):
        SamplingParams(n=n, temperature=0.0)


def test_temperature_zero_is_fine_for_one_sample():
    assert SamplingParams(n=1, temperature=0.0).temperature == 0.0


@pytest.mark.parametrize("kwargs, key", [
    (dict(n=0, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=8), "rollout.n=0"),
    (dict(n=2, temperature=-0.5, top_p=1.0, top_k=0, max_new_tokens=8), "rollout.temperature=-0.5"),
    (dict(n=2, temperature=1.0, top_p=0.0, top_k=0, max_new_tokens=8), "rollout.top_p=0.0"),
    (dict(n=2, temperature=1.0, top_p=1.0, top_k=-1, max_new_tokens=8), "rollout.top_k=-1"),
    (dict(n=2, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=0), "rollout.max_new_tokens=0"),
])
def test_bad_sampling_names_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        check_sampling(**kwargs)


def test_grpo_stage_refuses_greedy_groups_before_loading_anything():
    from stagewise.stages.grpo import check_config

    cfg = compose(["stage=grpo", "algorithm=grpo", "data=tiny_grpo", "reward=countdown",
                   "rollout.temperature=0", "rollout.n=4"])
    with pytest.raises(ValueError, match="rollout.temperature=0"):
        check_config(cfg)


# ------------------------------------------------------------------------------------------------ helpers
def test_left_pad_right_aligns_prompts():
    ids, mask = left_pad([[5, 6, 7], [9]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_decode_keeps_tags_and_drops_stop_ids(tiny):
    _, tok = tiny
    ids = tok("<think> 1 </think><answer>2</answer>", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert decode_completions(tok, [ids], [tok.eos_token_id, tok.pad_token_id]) == [
        "<think> 1 </think><answer>2</answer>"]


def test_rollout_batch_checks_row_counts():
    with pytest.raises(ValueError, match="texts has 1 rows, completion_ids 2"):
        RolloutBatch(prompt_ids=[[1], [1]], completion_ids=[[2], [3]], texts=["a"], truncated=[True, True])
    with pytest.raises(ValueError, match="row 0: 2 completion tokens but 1 engine log-probs"):
        RolloutBatch(prompt_ids=[[1]], completion_ids=[[2, 3]], texts=["a"], truncated=[True], logprobs=[[0.0]])


def test_rollout_batch_checks_the_multi_turn_fields():
    with pytest.raises(ValueError, match="2 completion tokens but 1 loss-mask entries"):
        RolloutBatch(prompt_ids=[[1]], completion_ids=[[2, 3]], texts=["a"], truncated=[True], loss_mask=[[1]])
    with pytest.raises(ValueError, match=r"env_columns\['turns'\] has 2 rows"):
        RolloutBatch(prompt_ids=[[1]], completion_ids=[[2]], texts=["a"], truncated=[True],
                     env_columns={"turns": [1, 2]})


def test_select_and_concat_keep_the_per_row_multi_turn_fields():
    batch = RolloutBatch(prompt_ids=[[1], [1]], completion_ids=[[2, 3], [4]], texts=["a", "b"],
                         truncated=[False, True], n=2, loss_mask=[[1, 0], [1]],
                         env_columns={"turns": [2, 1], "finish_reason": ["answer", "turn_length"]},
                         timing=RolloutTiming(generate_s=1.0, env_s=0.5, turns=2))
    picked = batch.select([1])
    assert picked.loss_mask == [[1]] and picked.env_columns == {"turns": [1], "finish_reason": ["turn_length"]}
    both = RolloutBatch.concat([batch, picked])
    assert both.loss_mask == [[1, 0], [1], [1]] and both.env_columns["turns"] == [2, 1, 1]
    single = RolloutBatch(prompt_ids=[[1]], completion_ids=[[2]], texts=["a"], truncated=[False])
    assert single.loss_mask is None and single.env_columns == {} and single.timing is None


# ------------------------------------------------------------------------------------------------ generators
def test_the_hf_backend_and_the_multi_turn_loop_are_generators(tiny):
    from stagewise.envs import build_env
    from stagewise.rollout.multiturn import MultiTurnRollout

    model, tok = tiny
    cfg = compose()
    backend = build_generator(cfg, model, tok)
    assert isinstance(backend, HFRollout) and isinstance(backend, Generator)
    agent = MultiTurnRollout(backend, tok, lambda: build_env(cfg.env), max_context_tokens=64)
    assert isinstance(agent, Generator) and agent.sampling == backend.sampling

    class NoGenerate:
        sampling = SamplingParams()

        def sync_weights(self, policy=None):
            pass

        def close(self):
            pass

    assert not isinstance(NoGenerate(), Generator)


# ------------------------------------------------------------------------------------------------ HF backend
PROMPTS = ["What is 1 + 2 + 3?", "Say something long please", "Hi"]


def prompt_ids(tok):
    return [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


def generate(model, tok, seed=0, **kw):
    sampling = SamplingParams(n=kw.pop("n", 4), max_new_tokens=kw.pop("max_new_tokens", 12),
                              stop=tuple(kw.pop("stop", ())))
    torch.manual_seed(seed)
    return HFRollout(model, tok, sampling, **kw).generate(prompt_ids(tok))


def test_hf_rollout_n_per_prompt_layout(tiny):
    model, tok = tiny
    batch = generate(model, tok, n=4, max_new_tokens=12, batch_size=5)  # 1 prompt per call: exercises chunking
    ids = prompt_ids(tok)
    assert len(batch) == 12 and batch.n == 4
    assert batch.prompt_ids == [ids[0]] * 4 + [ids[1]] * 4 + [ids[2]] * 4  # prompt-major
    for c, t in zip(batch.completion_ids, batch.truncated):
        assert 1 <= len(c) <= 12
        assert t == (len(c) == 12 and c[-1] != tok.eos_token_id)
    assert batch.logprobs is None


def test_hf_rollout_is_seeded_and_batch_size_invariant(tiny):
    model, tok = tiny
    a = generate(model, tok, seed=3, batch_size=64)
    b = generate(model, tok, seed=3, batch_size=64)
    assert a.completion_ids == b.completion_ids and a.texts == b.texts


@pytest.mark.parametrize("mode", [True, False])
def test_hf_rollout_restores_the_training_mode(tiny, mode):
    model, tok = tiny
    before = model.training
    model.train(mode)
    try:
        generate(model, tok, n=2, max_new_tokens=3)
        assert model.training is mode
    finally:
        model.train(before)


def first_fresh_token(tok, batch, min_pos=1):
    """A (row, position, token) whose decoded text does not occur in the completion before that position."""
    for row, ids in enumerate(batch.completion_ids):
        for k in range(min_pos, len(ids)):
            s = tok.decode([ids[k]])
            if len(s.strip()) >= 2 and s not in tok.decode(ids[:k]) and s.isprintable():
                return row, k, ids[k], s
    raise AssertionError("no usable token in the unstopped completions")


def test_stop_string_cuts_after_the_token_that_completes_it(tiny):
    model, tok = tiny
    free = generate(model, tok, seed=1, n=4, max_new_tokens=16)
    row, k, token, text = first_fresh_token(tok, free)
    stopped = generate(model, tok, seed=1, n=4, max_new_tokens=16, stop=[text])
    # Same seed, same batch: the row samples the same tokens until the stop string completes at position k.
    assert stopped.completion_ids[row] == free.completion_ids[row][:k + 1]
    assert stopped.truncated[row] is False
    assert stopped.texts[row].endswith(text)
    for ids, t, trunc in zip(stopped.completion_ids, stopped.texts, stopped.truncated):
        ended_by_eos = ids[-1] == tok.eos_token_id
        assert trunc == (text not in t and not ended_by_eos)
        if text in t and not ended_by_eos:  # the text stops right after the token that completed the stop string
            assert text not in tok.decode(ids[:-1])


def test_stop_token_id_ends_a_completion_and_is_not_decoded(tiny):
    model, tok = tiny
    free = generate(model, tok, seed=2, n=4, max_new_tokens=16)
    row, k, token, _ = first_fresh_token(tok, free)
    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = token  # the model now declares `token` as an end-of-turn id
    try:
        stopped = generate(model, tok, seed=2, n=4, max_new_tokens=16)
    finally:
        model.generation_config.eos_token_id = old
    assert stopped.completion_ids[row] == free.completion_ids[row][:k + 1]  # the stop id is kept (it is trained)
    assert stopped.truncated[row] is False
    assert stopped.texts[row] == tok.decode(free.completion_ids[row][:k], skip_special_tokens=False)


def test_ignore_eos_generates_exactly_max_new_tokens(tiny):
    model, tok = tiny
    torch.manual_seed(0)
    batch = HFRollout(model, tok, SamplingParams(n=3, max_new_tokens=9, ignore_eos=True)).generate(prompt_ids(tok))
    assert [len(c) for c in batch.completion_ids] == [9] * 9
    assert all(batch.truncated)


def test_engine_logprobs_match_the_trainer(tiny):
    """HF's own sampling log-probs equal the trainer's chunked log-probs of the same tokens (left-padded prompts,
    right-padded completions, position ids from the attention mask): the alignment TIS relies on."""
    from stagewise.training.batching import Sample, collate
    from stagewise.training.modeling import completion_logprobs

    model, tok = tiny
    torch.manual_seed(4)
    sampling = SamplingParams(n=3, max_new_tokens=10, temperature=0.7)
    batch = HFRollout(model, tok, sampling, return_logprobs=True).generate(prompt_ids(tok))
    # cut completions to different lengths (a prefix of a sample is a sample) so that completions are padded too
    cut = [3 + i % 5 for i in range(len(batch))]
    samples = [Sample(p, c[:k], 0.0, True, lp[:k])
               for p, c, lp, k in zip(batch.prompt_ids, batch.completion_ids, batch.logprobs, cut)]
    mb = collate(samples, tok.pad_token_id, "cpu")
    assert mb.tokens.sum(1).tolist() == [min(k, len(c)) for k, c in zip(cut, batch.completion_ids)]
    with torch.no_grad():
        lp, _ = completion_logprobs(model, model.get_output_embeddings(), mb, chunk_size=7, temperature=0.7)
    diff = (lp - mb.rollout_logprobs).abs()[mb.tokens]
    assert diff.numel() == sum(len(x.completion_ids) for x in samples)
    assert float(diff.max()) < 1e-4
    assert float(lp[~mb.tokens].abs().max()) == 0.0


# ------------------------------------------------------------------------------------------------ vLLM
def test_vllm_backends_are_imported_lazily():
    code = ("import sys; import stagewise.rollout, stagewise.stages.grpo; "
            "assert 'vllm' not in sys.modules and 'stagewise.rollout.vllm' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"


def test_vllm_backend_module_imports_without_vllm():
    mod = importlib.import_module("stagewise.rollout.vllm")
    assert hasattr(mod, "VLLMColocated") and hasattr(mod, "VLLMServerClient")
