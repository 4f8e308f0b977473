"""Asynchronous GRPO (``stage.max_staleness`` = k > 0): the decoupled objective on hand-computed values; a real
generator process that serves step-ordered batches at most k versions old, each generated on the weights pushed
for its version; and a restart from a checkpointed prompt position that consumes every prompt exactly once."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import compose
from stagewise.algorithms import policy_loss, truncated_is_weights
from stagewise.hydra_config import typed_config
from stagewise.models import load_model_and_tokenizer
from stagewise.rollout.prompt_batches import AsyncBatches, next_prompt_rows
from stagewise.stages.grpo import StepPlan, check_config
from stagewise.training import TrainState
from stagewise.training.batching import RowLayout


def test_decoupled_objective_equals_hand_computed_values():
    """AReaL's decoupled PPO (Fu et al. 2025, "AReaL", arXiv:2505.24298, eq. 5): the ratio is clipped against the
    proximal policy (the trainer's recompute at the weights the step starts from) and each token's term is weighted
    by pi_prox / pi_behav (the generator's log-probs), here truncated at the cap as TIS does (Yao et al. 2025; AReaL
    drops tokens above its cap instead).
        token 1: r = .5/.4 = 1.25 -> clipped 1.2; w = .4/.4 = 1            -> -1.2
        token 2: r = .3/.3 = 1;               w = .3/.1 = 3 -> cap 2       -> -2.0
        token 3: r = .9/.5 = 1.8 -> clipped 1.2; w = .5/.4 = 1.25          -> -1.5
    token_mean: -4.7 / 3; only token 2 is unclipped: d loss / d logprob = -w r A / 3 = -2/3 there, 0 elsewhere."""
    logprobs = torch.log(torch.tensor([[0.5, 0.3, 0.9]])).requires_grad_()
    proximal = torch.log(torch.tensor([[0.4, 0.3, 0.5]]))
    behaviour = torch.log(torch.tensor([[0.4, 0.1, 0.4]]))
    mask = torch.ones(1, 3)
    weights, metrics = truncated_is_weights(proximal, behaviour, mask, cap=2.0)
    assert weights[0].tolist() == pytest.approx([1.0, 2.0, 1.25], abs=1e-6)
    assert float(metrics["tis/frac_capped"]) == pytest.approx(1 / 3)
    loss, _ = policy_loss(logprobs, proximal, torch.tensor([1.0]), mask, clip_eps_low=0.2, clip_eps_high=0.2,
                          loss_agg="token_mean", is_weights=weights)
    assert loss.item() == pytest.approx(-4.7 / 3, abs=1e-6)
    loss.backward()
    assert logprobs.grad[0].tolist() == pytest.approx([0.0, -2 / 3, 0.0], abs=1e-6)


def test_asynchronous_limits_are_refused_naming_the_setting():
    base = ["experiment=tiny/grpo", "stage.max_staleness=1"]
    check_config(typed_config(compose(base)))  # the tiny recipe runs asynchronously
    for override, named in [("rollout=vllm", "rollout=vllm"), ("model.lora.enabled=true", "model.lora.enabled"),
                            ("algorithm.tis_cap=null", "algorithm.tis_cap=null"),
                            ("hardware=cpu_2proc", "more than one training process")]:
        with pytest.raises(ValueError, match="asynchronous GRPO") as err:
            check_config(typed_config(compose([*base, override])))
        assert named in str(err.value), (override, str(err.value))
    with pytest.raises(ValueError, match="stage.max_staleness=-1"):
        check_config(typed_config(compose(["experiment=tiny/grpo", "stage.max_staleness=-1"])))


@pytest.fixture(scope="module")
def setup():
    cfg = typed_config(compose(["experiment=tiny/grpo", "stage.max_staleness=2", "rollout.n=2",
                                "rollout.max_new_tokens=6", "rollout.temperature=1.0"]))
    model, tok = load_model_and_tokenizer(cfg.model)
    from datasets import Dataset

    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": f"{i} + {i}?"}], add_generation_prompt=True,
                                           tokenize=False))["input_ids"]
               for i in range(12)]
    ds = Dataset.from_dict({"prompt_ids": prompts, "answer": [str(2 * i) for i in range(12)]})
    plan = StepPlan(prompts_per_step=2, n=2, mini_batches=1, ppo_epochs=1, steps_per_epoch=6, total_steps=6,
                    world=1, per_device_batch_size=4, filter_groups=False, max_resample_rounds=0,
                    layout=RowLayout.PADDED_SHARED_PREFIX)
    return cfg, model, ds, plan


class OneRank:
    process_index, num_processes = 0, 1


def consume(batches: AsyncBatches, model, steps: int, weights_of: dict, k: int):
    """Train-loop stand-in: take each step's batch, check it, perturb the weights and push them as the next
    version (what the trainer does after an update). Returns the rows consumed, in order."""
    from stagewise.training.modeling import completion_logprobs
    from stagewise.training.batching import Sample, collate

    state = batches.state
    consumed = []
    for _ in range(steps):
        columns, batch = batches.next_round(OneRank())
        version = batch.env_columns["policy_version"][0]
        assert 0 <= state.step - version <= k and batches.last["async/staleness"] == state.step - version
        assert set(batch.env_columns["policy_version"]) == {version}
        # the engine generated on the weights pushed as that version: its log-probs are the trainer's there
        live = copy.deepcopy(model.state_dict())
        model.load_state_dict(weights_of[version])
        samples = [Sample(prompt_ids=p, completion_ids=c, advantage=0.0, trained=True)
                   for p, c in zip(batch.prompt_ids, batch.completion_ids)]
        with torch.no_grad():
            mine, _ = completion_logprobs(model, model.get_output_embeddings(), collate(samples, 0, "cpu"),
                                          chunk_size=64, temperature=1.0)
        engine = torch.zeros_like(mine)
        for i, lp in enumerate(batch.logprobs):
            engine[i, :len(lp)] = torch.tensor(lp)
        assert (mine - engine).abs().max().item() < 1e-4, version
        model.load_state_dict(live)
        consumed.append(list(columns["answer"]))
        with torch.no_grad():  # an "update": new weights, pushed as the next version
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        weights_of[state.step + 1] = copy.deepcopy(model.state_dict())
        batches.push_weights(model, version=state.step + 1)
        state.step += 1
        batches.after_step(state.step)
    return consumed


def test_generator_process_serves_fresh_enough_batches_and_a_restart_consumes_each_prompt_once(setup):
    cfg, model, ds, plan = setup
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    state = TrainState()
    weights_of = {0: copy.deepcopy(model.state_dict())}
    batches = AsyncBatches.start(cfg, model, ds, state, plan)
    try:
        first = consume(batches, model, 3, weights_of, k=2)
        assert batches.generator.pending == [3, 4, 5]  # k + 1 = 3 batches in flight at the "preemption"
    finally:
        batches.close()
        torch.set_num_threads(threads)
    checkpoint = copy.deepcopy(state)  # what a checkpoint saves: the consumed position, step 3 = version 3
    resumed = AsyncBatches.start(cfg, model, ds, checkpoint, plan)
    try:
        rest = consume(resumed, model, 3, weights_of, k=2)
    finally:
        resumed.close()
        torch.set_num_threads(threads)
    straight, order = TrainState(), []
    for _ in range(6):
        order.append([ds["answer"][int(i)] for i in next_prompt_rows(straight, plan, len(ds))])
    assert first + rest == order  # the in-flight batches were generated again: every prompt once, in order
    assert sorted(a for batch in order for a in batch) == sorted(ds["answer"])
    assert math.isfinite(resumed.last["async/push_s"]) and resumed.last["async/generate_s"] > 0


def test_the_grpo_stage_runs_asynchronously_and_logs_versions(tmp_path):
    """``stage.max_staleness=1`` through the GRPO stage: every step logs its staleness (<= 1) and the version it
    trained on, the samples parquet records each completion's version, and the trainer gets its threads back."""
    import json

    import pandas as pd

    from conftest import run_stage_in_process

    threads = torch.get_num_threads()
    run = run_stage_in_process(["experiment=tiny/grpo", "stage.max_staleness=1", "stage.max_steps=3",
                                "stage.prompts_per_step=4", "rollout.n=4", "rollout.max_new_tokens=8",
                                "stage.num_eval_prompts=4", "stage.samples_steps=3", "logger.progress_bar=false"],
                               tmp_path / "run")
    assert torch.get_num_threads() == threads
    steps = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "async/staleness" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:  # step s trains on a batch generated at version s - 1 - staleness, never older than k = 1
        assert r["async/staleness"] in (0.0, 1.0) and r["async/policy_version"] == r["step"] - 1 - r["async/staleness"]
        assert r["async/push_s"] >= 0 and r["async/wait_s"] >= 0 and "tis/weight_mean" in r
    samples = pd.read_parquet(run / "samples" / "step_3.parquet")
    assert len(samples) == 16 and set(samples["policy_version"]) == {steps[-1]["async/policy_version"]}


def test_weight_board_copies_tied_embeddings_once_and_the_generator_loads_them_tied():
    """A tied policy (input and output embeddings one tensor): the board keeps one shared tensor for both names,
    `publish` copies it once, and a copy of the board as the generator process receives it (pickled for spawn)
    still has one tensor for both names, which `load_into` loads into a tied model."""
    from multiprocessing.reduction import ForkingPickler

    from stagewise.rollout.async_generation import WeightBoard

    cfg = typed_config(compose(["experiment=tiny/grpo", "model.tiny.tie_word_embeddings=true"]))
    trainer, _ = load_model_and_tokenizer(cfg.model)
    generator, _ = load_model_and_tokenizer(cfg.model)
    names = list(trainer.state_dict())
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(names)
    board = WeightBoard(trainer.state_dict(), version=0)
    assert len(board.unique) == len(names) - 1 and "lm_head.weight" not in board.unique
    assert board.tensors["lm_head.weight"] is board.tensors["model.embed_tokens.weight"]
    received = copy.copy(board)  # its tensors as spawn pickles them (the version and lock are inherited objects)
    received.tensors = ForkingPickler.loads(ForkingPickler.dumps(board.tensors))
    assert received.tensors["lm_head.weight"] is received.tensors["model.embed_tokens.weight"]
    with torch.no_grad():
        trainer.get_input_embeddings().weight.add_(1.0)
        trainer.model.layers[0].mlp.up_proj.weight.mul_(-1.0)
    board.publish(trainer.state_dict(), version=1)
    assert received.load_into(generator, have=0) == 1 and received.load_into(generator, have=1) == 1
    for name, tensor in generator.state_dict().items():
        assert torch.equal(tensor, trainer.state_dict()[name]), name
    assert generator.get_output_embeddings().weight is generator.get_input_embeddings().weight


def test_a_generator_that_cannot_start_fails_the_first_batch_naming_the_cause(tmp_path):
    """The generator process starts beside the trainer; when it cannot load its model, the trainer's first `take`
    raises with the process's own error (here: the missing model folder), instead of waiting for a batch."""
    from stagewise.rollout.async_generation import AsyncGenerator

    missing = tmp_path / "no_such_model"
    cfg = typed_config(compose(["experiment=tiny/grpo", f"model.name_or_path={missing}"]))
    policy, _ = load_model_and_tokenizer(typed_config(compose(["experiment=tiny/grpo"])).model)
    generator = AsyncGenerator(cfg, policy, version=0, threads=1)
    try:
        generator.submit(0, [0], {"prompt_ids": [[1, 2, 3]]})
        with pytest.raises(RuntimeError, match="generator process failed") as err:
            generator.take()
        assert str(missing) in str(err.value)
    finally:
        generator.close()
