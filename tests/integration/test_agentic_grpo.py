"""Agentic RL end to end: the multi-turn loop with a scripted policy (masks, token ids, the Execute layout, stops,
per-trajectory workspaces, context and turn limits), the real hf backend stopping on tag ids, one GRPO step in
process where only policy tokens are trained (`python train.py` with the code env runs in the DeepAnalyze tiny
curriculum's RL stage: tests/integration/test_deepanalyze_tiny.py).

The tiny model does not write code, so the loop is driven by `ScriptedPolicy`: a stand-in backend whose generate()
returns fixed token ids for each trajectory's next turn, cut at the stop ids the loop asks for, as a real backend.
Everything else is real: tokenizer, sandbox processes, files, rewards, the GRPO step."""

from __future__ import annotations


import time

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from stagewise.algorithms import PolicyLossSettings
from stagewise.config import DataConfig, EnvConfig, ModelConfig, SourceConfig
from stagewise.data import load_prompt_dataset
from stagewise.data.generators.analysis_tasks import analysis_tasks, solution_code
from stagewise.envs import build_env
from stagewise.envs.code_sandbox import format_observation, task_workspace
from stagewise.models import load_model_and_tokenizer
from stagewise.rewards import RewardRunner
from stagewise.rollout import SamplingParams
from stagewise.rollout.multiturn import STOP_TAGS, MultiTurnRollout, encode_observations, single_token_id
from stagewise.rollout.prompt_batches import SyncBatches
from stagewise.stages.grpo import StepPlan, collect_groups, make_mini_batches
from stagewise.training.policy_update import StepContext, train_on_batch
from stagewise.tracking.rl_metrics import PhaseTimer
from stagewise.training.batching import collate
from stagewise.training import TrainState, build_accelerator, build_optimizer, build_scheduler

from conftest import compose
from scripted_policy import ReportingScriptedPolicy, ScriptedPolicy, StreamingScriptedPolicy


@pytest.fixture(params=[ScriptedPolicy, ReportingScriptedPolicy, StreamingScriptedPolicy],
                ids=["lockstep", "lockstep_early_code", "streaming"])
def Policy(request):
    """Each loop test runs three ways: turns batched in lockstep, with each code run started when its turn ends or
    once the call returns (rollout=hf does the first), and streamed one request each (vLLM)."""
    return request.param


@pytest.fixture(scope="module")
def tok():
    return load_model_and_tokenizer(ModelConfig())[1]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("ws")
    return analysis_tasks(2, workspace_root=str(root), mix={"qa": 1.0}, file_kinds=["csv"])


def prompt_ids(tok, row):
    return tok(tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True),
               add_special_tokens=False)["input_ids"]


def fenced(code):
    return f"<Code>\n```python\n{code}\n```\n</Code>"


def loop(policy, tok, env_cfg=None, n=2, max_new_tokens=256, max_context=4096):
    env_cfg = OmegaConf.structured(env_cfg or EnvConfig(name="code_sandbox", max_turns=5))
    return MultiTurnRollout(policy, tok, lambda: build_env(env_cfg), max_context_tokens=max_context,
                            stop_tags=STOP_TAGS["code_sandbox"], num_workers=4,
                            sampling=SamplingParams(n=n, max_new_tokens=max_new_tokens))


def test_trajectory_masks_layout_and_stop_ids(tok, tasks, Policy):
    row = tasks[0]
    gold = row["reward_spec"]["ground_truth"]
    p = tuple(prompt_ids(tok, row))
    scripts = {
        (p, 0): ["<Analyze>load and compute</Analyze>\n" + fenced(solution_code(row)),
                 f"\n<Understand>the output is the answer</Understand>\n<Answer>Answer: {gold}</Answer>"],
        (p, 1): ["<Analyze>guess</Analyze>\n<Code>\nprint(1 / 0)\n</Code> never generated",
                 "\n<Answer>Answer: 0</Answer><|im_end|>"],
    }
    policy = Policy(tok, scripts)
    batch = loop(policy, tok).generate([list(p)], tasks=[row])
    code_close, answer_close = single_token_id(tok, "</Code>"), single_token_id(tok, "</Answer>")
    ex_open, ex_close = single_token_id(tok, "<Execute>"), single_token_id(tok, "</Execute>")

    # lockstep: one generate call per turn over all live trajectories; streaming: the prompt once with its n samples,
    # then one request per trajectory's turn. Stop ids = EOS + </Code> + </Answer>, restored after
    calls = [(c["prompts"], c["n"]) for c in policy.calls]
    assert calls == ([(1, 2), (1, 1), (1, 1)] if Policy is StreamingScriptedPolicy else [(1, 2), (2, 1)])
    assert all(c["stop_ids"] == [tok.eos_token_id, code_close, answer_close] for c in policy.calls)
    assert policy.stop_ids == [tok.eos_token_id]

    outputs = [f"{gold}\n", "[Error]:\nTraceback (most recent call last):\n  File \"<string>\", line 1, in <module>\n"
               "    print(1 / 0)\nZeroDivisionError: division by zero"]
    for i in range(2):
        ids, mask = batch.completion_ids[i], batch.loss_mask[i]
        first_turn = policy.scripts[(p, i)][0]
        first_turn = first_turn[:first_turn.index(code_close) + 1]  # generation stopped at the </Code> id
        obs = encode_observations(tok, [format_observation(outputs[i])])[0]
        second = policy.turn_ids(list(p) + first_turn + obs)
        second = second[:second.index(answer_close) + 1]
        # the policy's ids are kept as sampled; the observation's ids sit between them with mask 0
        assert ids == first_turn + obs + second
        assert mask == [1] * len(first_turn) + [0] * len(obs) + [1] * len(second)
        assert ids[len(first_turn)] == tok.encode("\n", add_special_tokens=False)[0]
        assert ids[len(first_turn) + 1] == ex_open and ids[len(first_turn) + len(obs) - 2] == ex_close
        text = batch.texts[i]
        assert text.count("<Execute>") == text.count("</Execute>") == 1 and text.endswith("</Answer>")
        assert "</Code>\n<Execute>\n" in text and "\n</Execute>\n\n<" in text
    assert "never generated" not in batch.texts[1]
    assert batch.texts[0].split("<Execute>\n")[1].startswith(f"{gold}\n\n</Execute>")  # print's newline kept
    assert batch.env_columns == {"turns": [2, 2], "code_calls": [1, 1], "code_errors": [0, 1],
                                      "code_timeouts": [0, 0], "answered": [1, 1],
                                      "finish_reason": ["answer", "answer"]}
    assert batch.truncated == [False, False] and batch.n == 2 and batch.logprobs is None

    # reward=deepanalyze on what the loop produced: exact match for the right answer, 0 for the wrong one
    with RewardRunner({"functions": [{"name": "deepanalyze"}]}) as runner:
        cols = {k: [row[k]] * 2 for k in ("reward_spec", "data_source", "input_seq")}
        result = runner(batch.texts, **cols, **batch.env_columns)
    assert result.total == [1.0, 0.0]


def test_samples_of_a_prompt_never_see_each_others_files(tok, tasks, Policy):
    row = tasks[1]
    p = tuple(prompt_ids(tok, row))
    write = "import os\nopen('note.txt', 'a').write('{k}')\nprint(sorted(os.listdir('.')))"
    read = "print(open('note.txt').read())"
    scripts = {(p, k): ["<Analyze>w</Analyze>" + fenced(write.format(k=k)), fenced(read),
                        "<Answer>Answer: 1</Answer>"] for k in range(3)}
    batch = loop(Policy(tok, scripts), tok, n=3).generate([list(p)], tasks=[row])
    for k, text in enumerate(batch.texts):
        spans = [s.split("\n</Execute>")[0] for s in text.split("<Execute>\n")[1:]]
        assert spans == ["['note.txt', 'sales.csv']\n", f"{k}\n"]  # its own note only, even though all ran at once
    assert sorted(x.name for x in task_workspace(row).iterdir()) == ["sales.csv"]  # the source is untouched


def test_turn_and_context_limits(tok, tasks, Policy):
    row = tasks[0]
    p = tuple(prompt_ids(tok, row))
    code_turn = "<Analyze>again</Analyze>" + fenced("print('x' * 30)")
    # max_turns: the env ends the episode after its 2nd step; the last observation is still appended
    env_cfg = EnvConfig(name="code_sandbox", max_turns=2)
    batch = loop(Policy(tok, {(p, 0): [code_turn] * 3}), tok, env_cfg, n=1).generate([list(p)], tasks=[row])
    assert batch.env_columns["finish_reason"] == ["max_turns"] and batch.truncated == [True]
    assert batch.texts[0].count("</Execute>") == 2 and batch.env_columns["turns"] == [2]

    turn_ids = Policy(tok, {(p, 0): [code_turn]}).scripts[(p, 0)][0]
    # the observation would not fit: not appended, the trajectory ends at the limit
    limit = len(p) + len(turn_ids) + 3
    policy = Policy(tok, {(p, 0): [code_turn] * 3})
    batch = loop(policy, tok, n=1, max_context=limit).generate([list(p)], tasks=[row])
    assert batch.completion_ids[0] == turn_ids and batch.loss_mask[0] == [1] * len(turn_ids)
    assert batch.env_columns["finish_reason"] == ["context"] and batch.env_columns["code_calls"] == [1]
    # a turn longer than the room left is cut at the limit, and the backend was asked for no more than that
    policy = Policy(tok, {(p, 0): [code_turn]})
    batch = loop(policy, tok, n=1, max_context=len(p) + 5).generate([list(p)], tasks=[row])
    assert batch.completion_ids[0] == turn_ids[:5] and batch.truncated == [True]
    assert policy.calls[0]["max_new_tokens"] == 5 and batch.env_columns["finish_reason"] == ["context"]
    # EOS ends the trajectory (not truncated); a turn that hits rollout.max_new_tokens is truncated
    eos = loop(Policy(tok, {(p, 0): ["<Analyze>done</Analyze><|im_end|>"]}), tok, n=1)
    batch = eos.generate([list(p)], tasks=[row])
    assert batch.env_columns["finish_reason"] == ["eos"] and batch.truncated == [False]
    assert batch.completion_ids[0][-1] == tok.eos_token_id and "<|im_end|>" not in batch.texts[0]
    long = loop(Policy(tok, {(p, 0): [code_turn]}), tok, n=1, max_new_tokens=4)
    batch = long.generate([list(p)], tasks=[row])
    assert batch.env_columns["finish_reason"] == ["turn_length"] and len(batch.completion_ids[0]) == 4


def test_a_failing_env_ends_only_its_own_trajectory(tok, tasks, Policy):
    from stagewise.envs import Env, Step

    class Flaky(Env):
        def reset(self, task=None):
            self.bad = task.get("bad", False)
            return ""

        def step(self, action):
            if self.bad:
                raise RuntimeError("disk full")
            if "</Answer>" in action:
                return Step("", 0.0, True, {"answered": True})
            return Step("\n<Execute>\nok\n</Execute>\n", 0.0, False, {"executed": True, "error": False})

    rows = [{"bad": True}, {"bad": False}]
    prompts = [tok("first task")["input_ids"], tok("second task")["input_ids"]]
    turns = ["<Analyze>a</Analyze>" + fenced("print(1)"), "<Answer>Answer: 1</Answer>"]
    policy = Policy(tok, {(tuple(p), 0): turns for p in prompts})
    agent = MultiTurnRollout(policy, tok, Flaky, max_context_tokens=1024, stop_tags=STOP_TAGS["code_sandbox"],
                             sampling=SamplingParams(n=1, max_new_tokens=128))
    batch = agent.generate(prompts, tasks=rows)
    cols = batch.env_columns
    assert cols["finish_reason"] == ["env_error", "answer"] and batch.truncated == [True, False]
    assert cols["code_calls"] == [1, 1] and cols["code_errors"] == [1, 0]
    assert "<Execute>" not in batch.texts[0] and batch.texts[1].count("<Execute>\nok\n</Execute>") == 1
    # a prompt already longer than the context is not generated at all
    short = MultiTurnRollout(Policy(tok, {(tuple(prompts[0]), 0): turns}), tok, Flaky,
                             max_context_tokens=2, stop_tags=STOP_TAGS["code_sandbox"])
    batch = short.generate(prompts[:1], SamplingParams(n=1, max_new_tokens=8), tasks=rows[:1])
    assert batch.completion_ids == [[]] and batch.env_columns["finish_reason"] == ["context"]
    assert short.backend.calls == []


def test_hf_backend_stops_on_the_tag_ids(tok):
    """The real hf backend on a tiny model whose head can only say </Code> or </Answer>: every turn is exactly one
    token, so generation stopped on the tag id (it would otherwise run to max_new_tokens)."""
    from stagewise.rollout.hf import HFRollout

    model, _ = load_model_and_tokenizer(ModelConfig())
    code_close, answer_close = single_token_id(tok, "</Code>"), single_token_id(tok, "</Answer>")
    with torch.no_grad():
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0  # the final hidden state is +-|x| along one axis
        model.lm_head.weight.zero_()
        model.lm_head.weight[code_close, 0] = 50.0
        model.lm_head.weight[answer_close, 0] = -50.0
    backend = HFRollout(model, tok, SamplingParams(n=1, temperature=0.0, max_new_tokens=8), batch_size=8)
    env_cfg = OmegaConf.structured(EnvConfig(name="code_sandbox", max_turns=4))
    agent = MultiTurnRollout(backend, tok, lambda: build_env(env_cfg), max_context_tokens=512,
                             stop_tags=STOP_TAGS["code_sandbox"], num_workers=2)
    prompts = [tok("Which region sells most?")["input_ids"], tok("hello")["input_ids"]]
    batch = agent.generate(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=8), tasks=[{}, {}])
    # (with this seed) one trajectory says </Code> until env.max_turns=4, the other answers at once
    assert batch.env_columns["finish_reason"] == ["max_turns", "answer"]
    assert batch.env_columns["turns"] == [4, 1]
    assert backend.stop_ids == [tok.eos_token_id]
    no_code = encode_observations(tok, [format_observation(
        "[Error]:\nNo code is provided. To run code, write a Code action: the Code tag, a ```python fenced block, "
        "then the closing Code tag. To finish, write the final answer in an Answer action.")])[0]
    for ids, mask, cols in zip(batch.completion_ids, batch.loss_mask,
                               [dict(zip(batch.env_columns, v)) for v in zip(*batch.env_columns.values())]):
        policy_ids = [t for t, m in zip(ids, mask) if m]
        assert set(policy_ids) <= {code_close, answer_close} and len(policy_ids) == cols["turns"]
        # each </Code> (a turn without a code block) got the "no code" error observation, an error step
        expected = []
        for t in policy_ids:
            expected += [t] + (no_code if t == code_close else [])
        assert ids == expected
        assert cols["code_calls"] == cols["code_errors"] == policy_ids.count(code_close)
        assert cols["finish_reason"] == ("answer" if policy_ids[-1] == answer_close else "max_turns")


def test_hf_backend_reports_each_stopped_row_once_with_its_final_ids(tok):
    """``on_finished`` on the real hf backend: a seeded run without extra stops gives rows R; the same seed with a
    token of R[0] (its 5th) as a stop id must stop each row at its first stop id (kept) and run the others to
    max_new_tokens (the rows are independent, so their tokens are R's). Exactly the stopped rows are reported, once,
    with those ids and their index in the batch (the prompts are not in length order: the backend sorts them)."""
    from stagewise.rollout.hf import HFRollout

    model, _ = load_model_and_tokenizer(ModelConfig())
    prompts = [tok(t)["input_ids"] for t in ("a longer prompt than the others, by far", "hi", "a middle one")]
    assert sorted(range(3), key=lambda i: len(prompts[i])) != [0, 1, 2]
    sampling = SamplingParams(n=2, temperature=1.0, max_new_tokens=12)
    backend = HFRollout(model, tok, sampling, batch_size=6)
    torch.manual_seed(0)
    free = backend.generate(prompts).completion_ids
    stop = free[0][4]
    backend.stop_ids = backend.stop_ids + [stop]
    expected = [ids[:next((k + 1 for k, t in enumerate(ids) if t in backend.stop_ids), len(ids))] for ids in free]
    reported = []
    torch.manual_seed(0)
    batch = backend.generate(prompts, on_finished=lambda i, ids: reported.append((i, ids)))
    assert batch.completion_ids == expected
    stopped = [i for i, ids in enumerate(expected) if ids[-1] in backend.stop_ids]
    assert 0 in stopped and len(stopped) < 6 and batch.truncated == [i not in stopped for i in range(6)]
    assert sorted(reported) == [(i, expected[i]) for i in stopped]


def test_lockstep_code_runs_start_while_the_turn_still_generates(tok, tasks):
    """With a backend that reports rows as they stop (rollout=hf), each code run starts during the generate call
    whose turn ended it, not after the call: here every call lingers 1 s after reporting, and each env step started
    before its call returned. The batch is the one the loop builds when code runs wait for the call."""
    from stagewise.envs.code_sandbox import CodeSandboxEnv

    row = tasks[0]
    gold = row["reward_spec"]["ground_truth"]
    p = tuple(prompt_ids(tok, row))
    scripts = {(p, 0): ["<Analyze>compute</Analyze>\n" + fenced(solution_code(row)),
                        f"<Answer>Answer: {gold}</Answer>"],
               (p, 1): [fenced("print(6 * 7)"), "<Answer>Answer: 42</Answer>"]}
    started = []

    class Recording(CodeSandboxEnv):  # the real env, noting when each step starts
        def step(self, action):
            started.append(time.monotonic())
            return super().step(action)

    env_cfg = OmegaConf.structured(EnvConfig(name="code_sandbox", max_turns=5))

    def run(policy):
        agent = MultiTurnRollout(policy, tok, lambda: Recording.from_config(env_cfg), max_context_tokens=4096,
                                 stop_tags=STOP_TAGS["code_sandbox"], num_workers=4,
                                 sampling=SamplingParams(n=2, max_new_tokens=256))
        return agent.generate([list(p)], tasks=[row])

    early = ReportingScriptedPolicy(tok, scripts, linger_s=1.0)
    batch = run(early)
    first_turn_steps, answer_steps = sorted(started[:2]), sorted(started[2:])
    assert len(started) == 4 and len(early.returned_at) == 2
    assert first_turn_steps[-1] < early.returned_at[0] - 0.5  # both code runs began while call 1 lingered
    assert early.returned_at[0] < answer_steps[0] and answer_steps[-1] < early.returned_at[1] - 0.5
    assert batch.env_columns["finish_reason"] == ["answer", "answer"] and batch.env_columns["code_errors"] == [0, 0]
    assert "\n<Execute>\n42\n\n</Execute>\n" in batch.texts[1]
    started.clear()
    waited = run(ScriptedPolicy(tok, scripts))
    assert len(started) == 4
    for field in ("completion_ids", "loss_mask", "texts", "truncated", "env_columns"):
        assert getattr(batch, field) == getattr(waited, field), field


def test_one_grpo_step_trains_only_policy_tokens(tok, tmp_path):
    """collect_groups -> make_mini_batches -> train_on_batch with env=code_sandbox: rewards from the real sandbox and
    reward, env tokens masked, and the token-mean loss normalised by policy tokens only."""
    rows = analysis_tasks(2, workspace_root=str(tmp_path / "ws"), mix={"qa": 1.0}, file_kinds=["csv", "sqlite"])
    pd.DataFrame(rows).to_parquet(tmp_path / "tasks.parquet")
    train_ds = load_prompt_dataset(DataConfig(sources=[SourceConfig(path=str(tmp_path / "tasks.parquet"))],
                                              system_prompt="", max_prompt_length=512), tok).train
    scripts = {}
    for r in train_ds:
        p, gold = tuple(r["prompt_ids"]), r["reward_spec"]["ground_truth"]
        code = solution_code(next(x for x in rows if x["workspace_id"] == r["workspace_id"]))
        scripts[(p, 0)] = ["<Analyze>compute</Analyze>\n" + fenced(code), f"<Answer>Answer: {gold}</Answer>"]
        scripts[(p, 1)] = ["<Analyze>guess</Analyze>\n" + fenced("print(len('abc'))"), "<Answer>Answer: ?</Answer>"]
    cfg = compose(["stage=grpo", "env=code_sandbox", "reward=deepanalyze", "algorithm.loss_agg=token_mean",
                   "rollout.n=2", "stage.learning_rate=1e-3"])
    acc = build_accelerator(cfg.hardware)
    agent = MultiTurnRollout(ScriptedPolicy(tok, scripts), tok, lambda: build_env(cfg.env), max_context_tokens=2048,
                             stop_tags=STOP_TAGS["code_sandbox"], num_workers=4,
                             sampling=SamplingParams(n=2, max_new_tokens=256))
    plan = StepPlan(prompts_per_step=2, n=2, mini_batches=1, ppo_epochs=1, steps_per_epoch=1, total_steps=1,
                    world=1, per_device_batch_size=4, filter_groups=False, max_resample_rounds=0)
    with RewardRunner(cfg.reward) as rewards:
        groups = collect_groups(acc, SyncBatches(agent, train_ds, TrainState(), plan), rewards, plan, cfg.algorithm,
                                PhaseTimer())
    arrays = groups.log_arrays
    assert arrays["reward/deepanalyze"].tolist() == [1.0, 0.0, 1.0, 0.0]  # right answer vs "?"
    assert arrays["env/turns"].tolist() == [2.0] * 4 and arrays["env/code_errors"].tolist() == [0.0] * 4
    samples = groups.samples
    assert [s.advantage > 0 for s in samples] == [True, False, True, False]
    assert all(s.loss_mask is not None and len(s.loss_mask) == len(s.completion_ids) for s in samples)
    mb = collate(samples, tok.pad_token_id, "cpu")
    for i, s in enumerate(samples):
        c = len(s.completion_ids)
        assert mb.mask[i, :c].tolist() == [bool(m) for m in s.loss_mask] and not mb.mask[i, c:].any()
        assert mb.tokens[i, :c].all() and 0 < sum(s.loss_mask) < c

    model, _ = load_model_and_tokenizer(ModelConfig())
    ctx = StepContext(acc=acc, model=model, policy=model, ref_model=None, tokenizer=tok,
                      loss=PolicyLossSettings.from_config(cfg.algorithm, 256), alg=cfg.algorithm, hw=cfg.hardware,
                      temperature=1.0, use_tis=False)
    optimizer = build_optimizer(model, cfg.stage)
    update = train_on_batch(ctx, make_mini_batches(ctx, samples, plan, acc), optimizer,
                            build_scheduler(optimizer, cfg.stage, 1), 1.0, 1)
    # ratio 1 on the first update: token-mean loss = -sum(A_i * policy_tokens_i) / sum(policy_tokens_i)
    policy_tokens = [sum(s.loss_mask) for s in samples]
    expected = -sum(s.advantage * n for s, n in zip(samples, policy_tokens)) / sum(policy_tokens)
    with_env = -sum(s.advantage * len(s.completion_ids) for s in samples) / sum(len(s.completion_ids) for s in samples)
    assert update.metrics["loss"] == pytest.approx(expected, abs=1e-5)
    assert abs(expected - with_env) > 1e-3 and update.optimizer_steps == 1 and update.metrics["grad_norm"] > 0
