"""The GRPO loop's pieces on the tiny model: exact gradient accumulation, dynamic sampling, truncation masking,
the step plan, and the logged statistics."""

import json
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from stagewise.algorithms import PolicyLossSettings
from stagewise.config import ModelConfig, R1_ZERO_SYSTEM_PROMPT
from stagewise.models import load_model_and_tokenizer
from stagewise.rewards import RewardRunner
from stagewise.rollout import SamplingParams
from stagewise.rollout.hf import HFRollout
from stagewise.rollout.prompt_batches import SyncBatches
from stagewise.stages.grpo import StepPlan, collect_groups, make_mini_batches
from stagewise.training.policy_update import StepContext, train_on_batch
from stagewise.tracking.rl_metrics import PhaseTimer, rollout_statistics
from stagewise.tracking.window import Window
from stagewise.training.batching import RowLayout, Sample, collate
from stagewise.training.modeling import completion_logprobs
from stagewise.training import TrainState, build_accelerator, build_optimizer, build_scheduler

from conftest import compose


@pytest.fixture(scope="module")
def cfg():
    return compose(["stage=grpo", "algorithm=grpo", "data=tiny_grpo", "reward=countdown", "rollout.max_new_tokens=16",
                    "stage.learning_rate=1e-2"])


@pytest.fixture(scope="module")
def acc(cfg):
    return build_accelerator(cfg.hardware)


def plan_for(per_device, n=4, prompts=2, minis=1, epochs=1, filter_groups=False, rounds=0, max_tokens=0,
             share=False):
    """``share``: packed rows lay each group's prompt down once (padded rows always share it here)."""
    return StepPlan(prompts_per_step=prompts, n=n, mini_batches=minis, ppo_epochs=epochs, steps_per_epoch=10,
                    total_steps=1, world=1, per_device_batch_size=per_device, filter_groups=filter_groups,
                    max_resample_rounds=rounds, max_tokens_per_micro_batch=max_tokens,
                    layout=RowLayout.choose(max_tokens, gradient_checkpointing=False, varlen_attention=share))


def context(cfg, acc, model, tok, loss_agg):
    alg = OmegaConf.merge(cfg.algorithm, {"loss_agg": loss_agg})
    return StepContext(acc=acc, model=model, policy=model, ref_model=None, tokenizer=tok,
                       loss=PolicyLossSettings.from_config(alg, 16), alg=alg, hw=cfg.hardware, temperature=1.0,
                       use_tis=False)


# Two groups of four completions, different lengths; the last one is truncated and masked (trained=False).
ADV = [1.0, -1.0, 0.5, -0.5, 2.0, 0.0, -1.5, 3.0]
LENGTHS = [3, 7, 5, 2, 9, 4, 6, 8]
TRAINED = [True] * 7 + [False]


def hand_samples(tok):
    prompts = [tok("What is 2 + 2?")["input_ids"], tok("Name a prime number bigger than ten")["input_ids"]]
    g = torch.Generator().manual_seed(0)
    completions = [torch.randint(10, 900, (n,), generator=g).tolist() for n in LENGTHS]
    return [Sample(prompt_ids=prompts[i // 4], completion_ids=completions[i], advantage=ADV[i], trained=TRAINED[i])
            for i in range(8)]


def expected_loss(loss_agg, lengths=LENGTHS):
    """With one update the ratio is 1, so each token's loss is -A and the loss is an aggregate of -A."""
    trained = [(a, n) for a, n, t in zip(ADV, lengths, TRAINED) if t]
    if loss_agg == "token_mean":
        return -sum(a * n for a, n in trained) / sum(n for _, n in trained)
    if loss_agg == "seq_mean_token_mean":
        return -sum(a for a, _ in trained) / len(trained)
    return -sum(a * n / 16 for a, n in trained) / len(trained)  # Dr. GRPO: token sums over max_new_tokens=16


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_micro_batch_split_gives_the_one_batch_update(cfg, acc, loss_agg):
    """per_device_batch_size 8 (one micro-batch), 4 (two), 1 (eight) and 3 (3 + 3 + 2, uneven): same loss,
    gradient and weights."""
    results = []
    for per_device in (8, 4, 1, 3):
        model, tok = load_model_and_tokenizer(ModelConfig())
        ctx = context(cfg, acc, model, tok, loss_agg)
        # plain SGD with lr 1: the weight change is the gradient itself (Adam's first step is ~lr * sign(g), which
        # would hide a wrong gradient scale and amplify float noise in near-zero gradients)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        scheduler = build_scheduler(optimizer, cfg.stage, 1)
        minis = make_mini_batches(ctx, hand_samples(tok), plan_for(per_device), acc)
        assert [len(m) for m in minis] == [math.ceil(8 / per_device)]
        update = train_on_batch(ctx, minis, optimizer, scheduler, max_grad_norm=0.0, ppo_epochs=1)
        weights = torch.cat([p.detach().flatten() for p in model.parameters()])
        results.append((update, weights))
    ref_update, ref_weights = results[0]
    assert ref_update.metrics["loss"] == pytest.approx(expected_loss(loss_agg), abs=1e-6)
    assert ref_update.optimizer_steps == 1
    assert ref_update.metrics["grad_norm"] > 0
    for update, weights in results[1:]:
        assert update.metrics["loss"] == pytest.approx(ref_update.metrics["loss"], abs=1e-6)
        assert update.metrics["grad_norm"] == pytest.approx(ref_update.metrics["grad_norm"], rel=1e-4)
        assert torch.allclose(weights, ref_weights, atol=1e-6, rtol=1e-5)


WIDE_LENGTHS = [1, 40, 3, 25, 2, 60, 5, 12]  # completions 1 to 60 tokens: padding would be most of a padded batch


def wide_samples(tok):
    prompts = [tok("What is 2 + 2?")["input_ids"], tok("Name a prime number bigger than ten, then another one")["input_ids"]]
    g = torch.Generator().manual_seed(1)
    return [Sample(prompt_ids=prompts[i // 4], completion_ids=torch.randint(10, 900, (n,), generator=g).tolist(),
                   advantage=ADV[i], trained=TRAINED[i]) for i, n in enumerate(WIDE_LENGTHS)]


def test_pack_rows_lays_sequences_end_to_end():
    from stagewise.training.modeling import pack_rows

    packed = pack_rows([([5, 6, 7], [11, 12]), ([9], [13, 14, 15])], "cpu")
    assert packed.input_ids.tolist() == [[5, 6, 7, 11, 12, 9, 13, 14, 15]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3]]
    # position 2 (the last prompt token) predicts 11, 3 predicts 12; position 5 (prompt 9) predicts 13, ...
    assert packed.predict_index.tolist() == [2, 3, 5, 6, 7]
    assert packed.cu_seq_lens.tolist() == [0, 5, 9]  # sequence starts, then the row length


# (max_tokens_per_micro_batch, prompt laid down once per group, gradient checkpointing)
PACKINGS = [(0, False, False), (10_000, False, False), (70, False, False), (10_000, True, False), (70, True, False),
            (70, True, True)]


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_packed_micro_batches_give_the_padded_update(cfg, acc, loss_agg):
    """hardware.max_tokens_per_micro_batch: one unpadded row per micro-batch with restarting position_ids, or with
    each group's prompt carried once (the shared-prefix layout, also under gradient checkpointing). On completions
    of 1 to 60 tokens the log-probs, the loss, the gradient norm and the updated weights equal the padded path's
    (one micro-batch of 8 rows), with one packed micro-batch and with a budget that splits them."""

    results = []
    for budget, share, ckpt in PACKINGS:
        model, tok = load_model_and_tokenizer(ModelConfig())
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        ctx = context(cfg, acc, model, tok, loss_agg)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        scheduler = build_scheduler(optimizer, cfg.stage, 1)
        samples = wide_samples(tok)
        minis = make_mini_batches(ctx, samples, plan_for(8, max_tokens=budget, share=share), acc)
        if budget:
            rows = [mb.packed.input_ids for mb in minis[0]]
            assert all(r.shape[0] == 1 for r in rows)
            completions = sum(len(x.completion_ids) for x in samples)
            prompts = [len(samples[0].prompt_ids), len(samples[4].prompt_ids)]
            if not share:  # no pad token at all: every sample's prompt and completion
                assert sum(r.shape[1] for r in rows) == completions + 4 * sum(prompts)
            elif budget > 1000:  # one row: each of the two prompts once
                assert sum(r.shape[1] for r in rows) == completions + sum(prompts)
                assert [g.completion_lens for g in minis[0][0].packed.shared_prefix_layout.groups] == [
                    tuple(WIDE_LENGTHS[:4]), tuple(WIDE_LENGTHS[4:])]
            else:  # a group split over micro-batches carries its prompt in each
                assert all(r.shape[1] <= budget for r, mb in zip(rows, minis[0]) if len(mb.tokens) > 1)
        with torch.no_grad():
            lp = torch.cat([completion_logprobs(model, model.get_output_embeddings(), mb, 5, 0.8)[0].flatten()
                            for mb in minis[0]])
        update = train_on_batch(ctx, minis, optimizer, scheduler, max_grad_norm=0.0, ppo_epochs=1)
        weights = torch.cat([p.detach().flatten() for p in model.parameters()])
        results.append((sorted(lp[lp != 0].tolist()), len(minis[0]), update, weights))
    (ref_lp, _, ref_update, ref_weights) = results[0]
    assert len(ref_lp) == sum(WIDE_LENGTHS) and results[1][1] == 1 and results[2][1] > 1 and results[4][1] > 1
    assert ref_update.metrics["loss"] == pytest.approx(expected_loss(loss_agg, WIDE_LENGTHS), abs=1e-6)
    for (budget, share, ckpt), (lp, _, update, weights) in zip(PACKINGS[1:], results[1:]):
        assert np.allclose(lp, ref_lp, atol=1e-5), (budget, share, ckpt)
        assert update.metrics["loss"] == pytest.approx(ref_update.metrics["loss"], abs=1e-6)
        assert update.metrics["grad_norm"] == pytest.approx(ref_update.metrics["grad_norm"], rel=1e-5)
        assert torch.allclose(weights, ref_weights, atol=1e-5, rtol=1e-5), (budget, share, ckpt)


def test_two_mini_batches_take_two_optimizer_steps_with_old_logprobs(cfg, acc):
    from stagewise.training.policy_update import fill_old_and_ref_logprobs

    model, tok = load_model_and_tokenizer(ModelConfig())
    ctx = context(cfg, acc, model, tok, "seq_mean_token_mean")
    optimizer = build_optimizer(model, cfg.stage)
    scheduler = build_scheduler(optimizer, cfg.stage, 2)
    minis = make_mini_batches(ctx, hand_samples(tok), plan_for(4, minis=2), acc)
    assert [len(m) for m in minis] == [1, 1]  # one group (4 samples) per mini-batch
    fill_old_and_ref_logprobs(ctx, minis, need_old=True)
    assert all(mb.old_logprobs is not None and mb.ref_logprobs is None for m in minis for mb in m)
    update = train_on_batch(ctx, minis, optimizer, scheduler, max_grad_norm=1.0, ppo_epochs=1)
    assert update.optimizer_steps == 2
    # The first mini-batch is on-policy (ratio 1); the second is seen after one update, so its ratio moved.
    assert update.metrics["ratio/max"] > 1.0 or update.metrics["ratio/min"] < 1.0


def test_collate_pads_left_then_right_and_masks(tiny):
    _, tok = tiny
    a = Sample([5, 6, 7], [11, 12], 1.0, True)
    b = Sample([9], [13, 14, 15], -1.0, False)
    mb = collate([a, b], pad_id=0, device="cpu")
    assert mb.input_ids.tolist() == [[5, 6, 7, 11, 12, 0], [0, 0, 9, 13, 14, 15]]
    assert mb.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 4, 4], [0, 0, 0, 1, 2, 3]]
    assert mb.targets.tolist() == [[11, 12, -1], [13, 14, 15]]
    assert mb.mask.tolist() == [[True, True, False], [False, False, False]]  # b is not trained
    assert mb.prompt_width == 3 and mb.advantages.tolist() == [1.0, -1.0]


# ------------------------------------------------------------------------------------------------ dynamic sampling
def parity_reward(completions, answer, **kwargs):
    """Even answers: 1.0 for every sample (a zero-variance group). Odd: a number that differs between samples."""
    return [1.0 if int(a) % 2 == 0 else (sum(map(ord, c)) % 97) / 97 for c, a in zip(completions, answer)]


@pytest.fixture(scope="module")
def prompt_data(tmp_path_factory, cfg):
    from stagewise.data import load_prompt_dataset

    path = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    path.write_text("".join(json.dumps({"problem": f"Question number {i}?", "answer": str(i)}) + "\n"
                            for i in range(20)))
    data_cfg = OmegaConf.merge(cfg.data, {"sources": [{"path": str(path)}], "eval_sources": [],
                                          "system_prompt": "Be brief."})
    _, tok = load_model_and_tokenizer(ModelConfig())
    return load_prompt_dataset(data_cfg, tok, system_prompt=R1_ZERO_SYSTEM_PROMPT).train, tok


def test_dynamic_sampling_keeps_varied_groups_and_refills(acc, prompt_data, cfg):
    ds, tok = prompt_data
    model, _ = load_model_and_tokenizer(ModelConfig())
    rollout = HFRollout(model, tok, SamplingParams(n=3, max_new_tokens=6))
    rewards = RewardRunner({"functions": [{"name": f"{__file__}:parity_reward"}]})
    alg = OmegaConf.merge(cfg.algorithm, {"filter_zero_std_groups": True, "max_resample_rounds": 2})
    plan = plan_for(3, n=3, prompts=4, filter_groups=True, rounds=2)
    plan.seed = 5
    state = TrainState()
    torch.manual_seed(0)
    groups = collect_groups(acc, SyncBatches(rollout, ds, state, plan), rewards, plan, alg, PhaseTimer())

    order = np.random.default_rng([5, 0]).permutation(20)  # the epoch's prompt order for seed 5
    answers = [int(ds[int(i)]["answer"]) for i in order]
    kept, rounds_needed = [], 0
    for r in range(3):  # at most 1 + max_resample_rounds batches of 4 prompts; odd answers have varied rewards
        kept += [a for a in answers[4 * r:4 * r + 4] if a % 2 == 1]
        rounds_needed = r + 1
        if len(kept) >= 4:
            break
    kept = kept[:4]
    assert state.batch_in_epoch == rounds_needed  # each round consumed one batch of prompts
    assert len(groups.rounds) == rounds_needed
    assert groups.groups_generated == 4 * rounds_needed and groups.groups_kept == len(kept)
    even = sum(a % 2 == 0 for a in answers[:4 * rounds_needed])
    assert groups.frac_zero_std == pytest.approx(even / (4 * rounds_needed))
    logged = groups.sampling_metrics()  # under the names metrics.jsonl uses
    assert (logged["sampling/rounds"], logged["sampling/groups_generated"], logged["sampling/groups_kept"]) == \
        (rounds_needed, 4 * rounds_needed, len(kept))
    assert logged["frac_reward_zero_std"] == groups.frac_zero_std
    prompts_by_answer = {int(ds[i]["answer"]): ds[i]["prompt_ids"] for i in range(20)}
    assert [s.prompt_ids for s in groups.samples] == [prompts_by_answer[a] for a in kept for _ in range(3)]
    adv = np.array([s.advantage for s in groups.samples]).reshape(-1, 3)
    assert np.allclose(adv.sum(1), 0.0, atol=1e-5) and np.all(np.abs(adv).max(1) > 0)
    # every generated completion is logged, kept or not
    assert len(groups.log_arrays["reward/total"]) == 4 * rounds_needed * 3
    assert sum(r["kept"] for r in groups.records()) == 3 * len(kept)
    rewards.close()


def test_truncated_completions_are_masked_when_asked(acc, prompt_data, cfg):
    ds, tok = prompt_data
    model, _ = load_model_and_tokenizer(ModelConfig())
    rollout = HFRollout(model, tok, SamplingParams(n=2, max_new_tokens=3, ignore_eos=True))  # all truncated
    rewards = RewardRunner({"functions": [{"name": f"{__file__}:parity_reward"}]})
    for mask_truncated in (False, True):
        alg = OmegaConf.merge(cfg.algorithm, {"mask_truncated": mask_truncated})
        plan = plan_for(2, n=2, prompts=2)
        groups = collect_groups(acc, SyncBatches(rollout, ds, TrainState(), plan), rewards, plan, alg,
                                PhaseTimer())
        assert [s.trained for s in groups.samples] == [not mask_truncated] * 4
        mb = collate(groups.samples, tok.pad_token_id, "cpu")
        assert int(mb.mask.sum()) == (0 if mask_truncated else 12)
    rewards.close()


# ------------------------------------------------------------------------------------------------ plan and metrics
def test_step_plan_counts(cfg):
    stage = {"prompts_per_step": 64, "mini_batch_size": 32, "ppo_epochs": 2, "max_steps": 50}
    c = OmegaConf.merge(cfg, {"stage": stage, "rollout": {"n": 5}, "hardware": {"per_device_batch_size": 8}})
    plan = StepPlan.build(c, world=2, num_prompts=1000)
    assert (plan.mini_batches, plan.updates_per_step, plan.steps_per_epoch, plan.total_steps) == (2, 4, 15, 50)
    assert "4 optimizer step(s) per step, each 10 micro-batch(es) of 8 x 2 process(es)" in plan.describe()
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        StepPlan.build(c, world=3, num_prompts=1000)
    with pytest.raises(ValueError, match="fewer than stage.prompts_per_step=64"):
        StepPlan.build(c, world=1, num_prompts=10)


@pytest.mark.parametrize("override, message", [
    (["stage.mini_batch_size=3"], "stage.mini_batch_size=3 must divide stage.prompts_per_step=16"),
    (["reward=none"], "needs at least one reward"),
    (["stage.ppo_epochs=0"], "stage.ppo_epochs=0 must be >= 1"),
])
def test_check_config_names_the_key(override, message):
    from stagewise.stages.grpo import check_config

    cfg = compose(["stage=grpo", "algorithm=grpo", "data=tiny_grpo", "reward=countdown", *override])
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("=", "=")):
        check_config(cfg)


def test_window_and_rollout_statistics_over_two_steps():
    w = Window()
    nan = float("nan")
    step1 = {"reward/acc": np.array([1.0, 0.0, nan]), "reward/total": np.array([1.0, 0.0, 0.0]),
             "completion_tokens": np.array([4.0, 10.0, 6.0]), "truncated": np.array([0.0, 1.0, 0.0]),
             "prompt_tokens": np.array([5.0, 5.0, 5.0]), "chars": np.array([8.0, 30.0, 12.0]),
             "format_ok": np.array([1.0, 0.0, 0.0]), "indicators": np.array([2.0, 0.0, 1.0])}
    step2 = {k: v[:1] for k, v in step1.items()}
    w.add({"loss": 0.5, "clip_ratio/low_min": 0.1, "clip_ratio/high_max": 0.2, "time/step": 2.0}, arrays=step1,
          step_seconds=2.0)
    w.add({"loss": 1.5, "clip_ratio/low_min": 0.0, "clip_ratio/high_max": 0.4, "time/step": 1.0}, arrays=step2,
          step_seconds=1.0)
    out = {**w.means(), **rollout_statistics(w.arrays(), ["acc"], w.total("step_seconds"))}
    assert out["loss"] == 1.0 and out["clip_ratio/low_min"] == 0.0 and out["clip_ratio/high_max"] == 0.4
    # acc over the window: [1, 0, 1] scored, one None
    assert out["reward/acc/mean"] == pytest.approx(2 / 3)
    assert out["reward/acc/std"] == pytest.approx(np.std([1.0, 0.0, 1.0]))
    assert (out["reward/acc/min"], out["reward/acc/max"], out["reward/acc/none"]) == (0.0, 1.0, 1.0)
    assert out["reward/total/mean"] == pytest.approx(0.5)
    assert out["completions/mean_length"] == 6.0 and out["completions/max_length"] == 10.0
    assert out["completions/clipped_ratio"] == 0.25
    assert out["completions/mean_terminated_length"] == pytest.approx(14 / 3)
    assert out["quality/format_ok"] == 2.0 and out["quality/format_compliance"] == 0.5
    assert out["quality/reasoning_indicators"] == pytest.approx(5 / 4)
    assert out["time/step"] == 1.5 and out["perf/samples_per_s"] == pytest.approx(4 / 3.0)


def test_chunked_and_plain_lm_head_paths_agree(tiny, monkeypatch):
    """Small batches take one plain LM-head matmul, big ones the chunked, recomputed path: same values, same
    gradients (prompts and completions of different lengths, so both paddings are exercised)."""
    import stagewise.training.modeling as modeling

    model, tok = tiny
    samples = hand_samples(tok)
    mb = collate(samples, tok.pad_token_id, "cpu")
    head = model.get_output_embeddings()
    results = []
    for limit in (modeling.SMALL_LOGITS_BYTES, 0):  # 0: everything goes through chunked_token_logprobs
        monkeypatch.setattr(modeling, "SMALL_LOGITS_BYTES", limit)
        model.zero_grad()
        lp, ent = completion_logprobs(model, head, mb, chunk_size=5, temperature=0.8, with_entropy=True)
        (lp * mb.advantages[:, None]).sum().backward()
        results.append((lp.detach(), ent.detach(), head.weight.grad.clone(),
                        model.model.embed_tokens.weight.grad.clone()))
    model.zero_grad()
    (lp_a, ent_a, gh_a, ge_a), (lp_b, ent_b, gh_b, ge_b) = results
    assert int((lp_a != 0).sum()) == sum(LENGTHS)  # one log-prob per real completion token, zeros on padding
    assert torch.allclose(lp_a, lp_b, atol=1e-5) and torch.allclose(ent_a, ent_b, atol=1e-5)
    # embedding grads reach ~30 here: fp32 summation order differs between the paths, so compare relatively
    assert torch.allclose(gh_a, gh_b, rtol=1e-4, atol=1e-5) and torch.allclose(ge_a, ge_b, rtol=1e-4, atol=1e-5)


def test_a_zero3_partitioned_head_is_called_once_as_a_module_with_the_same_values(tiny, monkeypatch):
    """The one ZeRO-3 rule (`stagewise.training.modeling`): a head whose weight DeepSpeed has partitioned (``ds_id``)
    is called as a module exactly once per log-prob computation, so its hooks gather the weight once, on both the
    plain and the chunked path; here the weight is whole, so the values and gradients must equal the weight
    path's."""
    import stagewise.training.modeling as modeling

    model, tok = tiny
    mb = collate(hand_samples(tok), tok.pad_token_id, "cpu")
    head = model.get_output_embeddings()
    calls = []
    hook = head.register_forward_hook(lambda *_: calls.append(1))
    try:
        model.zero_grad()
        reference, _ = modeling.completion_logprobs(model, head, mb, chunk_size=5, temperature=0.8)
        (reference * mb.advantages[:, None]).sum().backward()
        reference_grad = head.weight.grad.clone()
        assert len(calls) == 1  # the model's own forward (one kept logit); the plain rule multiplies by the weight
        head.weight.ds_id = 0  # what ZeRO-3 marks a partitioned parameter with
        for limit in (modeling.SMALL_LOGITS_BYTES, 0):
            monkeypatch.setattr(modeling, "SMALL_LOGITS_BYTES", limit)
            calls.clear()
            model.zero_grad()
            lp, _ = modeling.completion_logprobs(model, head, mb, chunk_size=5, temperature=0.8)
            (lp * mb.advantages[:, None]).sum().backward()
            # the model's forward, then one call for the 44 completion tokens, one plain matmul or 9 chunks of 5
            assert len(calls) == 2
            assert "forward" not in head.__dict__  # the class's forward is back
            assert torch.allclose(lp, reference.detach(), atol=1e-6)
            assert torch.allclose(head.weight.grad, reference_grad, rtol=1e-4, atol=1e-6)
    finally:
        hook.remove()
        if hasattr(head.weight, "ds_id"):
            del head.weight.ds_id
    assert modeling.vocab_size(head) == head.weight.shape[0]


def test_shared_prefix_pass_equals_the_full_sequence_pass(tiny):
    """Running each distinct prompt once and indexing its KV cache out to the group gives the same log-probs and
    the same gradients as running every prompt + completion row in full."""

    model, tok = tiny
    full = collate(hand_samples(tok), tok.pad_token_id, "cpu")
    shared = collate(hand_samples(tok), tok.pad_token_id, "cpu", RowLayout.PADDED_SHARED_PREFIX)
    assert full.unique_rows is None and full.prompt_index is None
    assert shared.prompt_index.tolist() == [0, 0, 0, 0, 1, 1, 1, 1] and shared.unique_rows.tolist() == [0, 4]
    head = model.get_output_embeddings()
    was_training = model.training
    model.train()
    results = []
    for mb in (full, shared):
        model.zero_grad()
        lp, _ = completion_logprobs(model, head, mb, chunk_size=64, temperature=1.0)
        (lp * mb.advantages[:, None]).sum().backward()
        results.append((lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    model.zero_grad()
    model.train(was_training)
    (lp_full, g_full), (lp_shared, g_shared) = results
    assert torch.allclose(lp_full, lp_shared, atol=1e-5)
    for name in g_full:
        assert torch.allclose(g_full[name], g_shared[name], atol=1e-5, rtol=1e-4), name


def test_reference_logprobs_from_a_frozen_copy_and_from_the_disabled_adapter(cfg, acc):
    """beta > 0: full fine-tuning compares with a frozen copy of the initial policy; LoRA with the base model
    (adapter disabled). Both equal the policy before it moves and stay put when it moves."""
    from peft import LoraConfig, get_peft_model

    from stagewise.models import frozen_copy
    from stagewise.training.policy_update import fill_old_and_ref_logprobs

    alg = OmegaConf.merge(cfg.algorithm, {"beta": 0.04})
    for lora in (False, True):
        model, tok = load_model_and_tokenizer(ModelConfig())
        ref = None if lora else frozen_copy(model)
        if lora:
            model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        ctx = StepContext(acc=acc, model=model, policy=model, ref_model=ref, tokenizer=tok,
                          loss=PolicyLossSettings.from_config(alg, 16), alg=alg, hw=cfg.hardware, temperature=1.0,
                          use_tis=False)
        minis = make_mini_batches(ctx, hand_samples(tok), plan_for(8), acc)
        fill_old_and_ref_logprobs(ctx, minis, need_old=True)
        mb = minis[0][0]
        assert torch.equal(mb.old_logprobs, mb.ref_logprobs)  # LoRA's B starts at zero: policy == base
        ref_before = mb.ref_logprobs.clone()
        with torch.no_grad():  # move the policy: the adapter (LoRA) or a base weight (full fine-tuning)
            for name, p in model.named_parameters():
                if p.requires_grad and ("lora_B" in name or not lora):
                    p.add_(0.05 * torch.randn_like(p))
        fill_old_and_ref_logprobs(ctx, minis, need_old=True)
        assert torch.equal(mb.ref_logprobs, ref_before)
        moved = (mb.old_logprobs - mb.ref_logprobs).abs()[mb.tokens]
        assert float(moved.max()) > 1e-3


def test_no_learning_signal_warns_once_after_the_first_steps_without_one(caplog):
    """``experiment=tiny/grpo`` alone (the untrained tiny model): every group all-zero, step after step; the run
    now says so once, in one line, with the usual causes."""
    import logging

    import numpy as np

    from stagewise.tracking.alerts import NoSignalWatch

    watch = NoSignalWatch()
    with caplog.at_level(logging.WARNING, logger="stagewise.alerts"):
        said = [watch.add(1.0, np.zeros(64)) for _ in range(5)]
    assert said[:2] == [None, None] and said[3:] == [None, None]
    assert said[2].startswith("no learning signal: in each of the first 3 steps every group's rewards were identical "
                              "(total reward 0)") and "start from an SFT checkpoint" in said[2]
    assert len([r for r in caplog.records if "no learning signal" in r.getMessage()]) == 1
    learning = NoSignalWatch()  # a step with a signal first: never a warning
    assert [learning.add(f, np.array([0.0, 1.0])) for f in (1.0, 0.5, 1.0, 1.0, 1.0)] == [None] * 5
