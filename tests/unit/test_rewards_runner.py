"""RewardRunner: weighted sums that skip None, metrics, display names, failure isolation (raise, hang, crash) in
the worker pool, and the conf/reward presets composed against the RewardConfig schema."""

import logging
import math
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from stagewise.config import RewardConfig, RewardFnConfig
from stagewise.rewards import RewardRunner, build
from stagewise.rewards.runner import display_names

PRESETS = Path(__file__).resolve().parents[2] / "conf" / "reward"


def fn(name, weight=1.0, **params):
    return RewardFnConfig(name=name, weight=weight, params=params)


def test_weighted_total_skips_none_and_metrics():
    cfg = RewardConfig(functions=[fn("accuracy", 1.0), fn("format", 0.5),
                                  fn("soft_overlong", 2.0, max_completion_len=10, soft_punish_cache=5)],
                       num_workers=1)
    completions = ["<think>r</think><answer>\\boxed{4}</answer>", "\\boxed{5}", "<think>r</think><answer>x</answer>"]
    with RewardRunner(cfg) as runner:
        res = runner(completions, solution=["4", "4", "not a number"], completion_lengths=[3, 8, 12],
                     prompt=["p0", "p1", "p2"])
    assert res.per_fn == {"accuracy": [1.0, 0.0, None], "format": [1.0, 0.0, 1.0],
                          "soft_overlong": [0.0, pytest.approx(-0.6), -1.0]}
    # 1 + 0.5 + 0 | 0 + 0 + 2 * -0.6 | (None skipped) 0.5 + 2 * -1
    assert res.total == [1.5, pytest.approx(-1.2), -1.5]
    m = res.metrics
    assert (m["reward/accuracy/mean"], m["reward/accuracy/std"], m["reward/accuracy/min"], m["reward/accuracy/max"]) \
        == (0.5, 0.5, 0.0, 1.0)
    assert m["reward/accuracy/none"] == 1.0 and m["rewards/accuracy/errors"] == 0.0
    assert m["reward/format/mean"] == pytest.approx(2 / 3)
    assert m["reward/format/std"] == pytest.approx(math.sqrt(2 / 9))
    assert m["reward/soft_overlong/mean"] == pytest.approx(-1.6 / 3)
    assert (m["reward/soft_overlong/min"], m["reward/soft_overlong/max"]) == (-1.0, 0.0)
    assert m["reward/total/mean"] == pytest.approx(-0.4)
    assert m["reward/total/std"] == pytest.approx(math.sqrt(1.82))
    assert m["reward/total/unscored"] == 0.0


def test_row_scored_by_nobody_totals_zero_and_warns(caplog):
    with RewardRunner(RewardConfig(functions=[fn("accuracy")], num_workers=1)) as runner, \
            caplog.at_level(logging.WARNING, logger="stagewise.rewards"):
        res = runner(["\\boxed{4}", "\\boxed{4}"], solution=["4", "?"])
    assert res.per_fn["accuracy"] == [1.0, None]
    assert res.total == [1.0, 0.0]
    assert res.metrics["reward/total/unscored"] == 1.0
    assert any("1 of 2 samples were scored by no reward function" in r.getMessage() for r in caplog.records)


def test_missing_gold_column_is_an_error_per_sample_naming_the_columns(caplog):
    with RewardRunner(RewardConfig(functions=[fn("accuracy")], num_workers=1)) as runner, \
            caplog.at_level(logging.WARNING, logger="stagewise.rewards"):
        res = runner(["\\boxed{4}", "\\boxed{5}"], prompt=["a", "b"], completion_ids=[[1], [2]])
    assert res.per_fn["accuracy"] == [None, None]
    assert res.metrics["rewards/accuracy/errors"] == 2.0
    logged = [r.getMessage() for r in caplog.records if "needs a 'solution' or 'answer' column" in r.getMessage()]
    assert len(logged) == 1 and "got columns ['completion_ids', 'prompt']" in logged[0]


def test_display_names():
    functions = [fn("accuracy"), fn("accuracy"), fn("pkg.mod:judge_me"), fn("accuracy"),
                 RewardFnConfig(name="reward_model", alias="utility"),
                 RewardFnConfig(name="reward_model", alias="safety")]
    assert display_names(functions) == ["accuracy", "accuracy_2", "judge_me", "accuracy_3", "utility", "safety"]


def test_runner_config_is_checked_against_the_schema():
    """A plain dict is merged into RewardConfig: a misspelt key or a wrong type fails at construction, naming it."""
    from omegaconf.errors import ConfigKeyError, ValidationError

    with pytest.raises(ConfigKeyError, match="timeout"):
        RewardRunner({"functions": [{"name": "accuracy"}], "timeout": 3})
    with pytest.raises(ValidationError, match="weight"):
        RewardRunner({"functions": [{"name": "accuracy", "weight": "heavy"}]})
    with RewardRunner({"functions": [{"name": "accuracy", "weight": 2}], "timeout_s": 3}) as runner:
        assert runner.timeout_s == 3.0 and runner.entries[0].weight == 2.0 and runner.names == ["accuracy"]


def test_duplicate_functions_get_distinct_columns():
    cfg = RewardConfig(functions=[fn("format", 1.0), fn("format", 2.0)])
    with RewardRunner(cfg) as runner:
        res = runner(["<think>a</think><answer>b</answer>", "x"])
    assert res.per_fn == {"format": [1.0, 0.0], "format_2": [1.0, 0.0]}
    assert res.total == [3.0, 0.0]


PROBES = textwrap.dedent("""
    import os, threading
    from stagewise.rewards import SampleReward

    class ProcessProbe(SampleReward):
        executor = "process"
        def per_sample(self, completion, row):
            if completion == "hang":
                while True:
                    pass
            if completion == "boom":
                raise ValueError("boom")
            if completion == "die":
                os._exit(3)
            return len(completion) + row["k"]

    class ThreadProbe(SampleReward):
        executor = "thread"
        concurrency = 3
        def per_sample(self, completion, row):
            return 1.0 if threading.current_thread() is not threading.main_thread() else 0.0

    def picky(completions, **columns):
        if "bad" in completions:
            raise RuntimeError("cannot score 'bad'")
        return [len(c) for c in completions]
""")


@pytest.fixture
def probes(tmp_path):
    path = tmp_path / "probes.py"
    path.write_text(PROBES)
    return path


def test_pool_isolates_raise_hang_and_crash(probes, caplog):
    cfg = RewardConfig(functions=[fn(f"{probes}:ProcessProbe"), fn("format")], timeout_s=1.0, num_workers=2)
    completions = ["ok", "hang", "boom", "boom", "die", "fine"]
    with RewardRunner(cfg) as runner, caplog.at_level(logging.WARNING, logger="stagewise.rewards"):
        res = runner(completions, k=[0, 1, 2, 3, 4, 5])
        assert res.per_fn["ProcessProbe"] == [2.0, None, None, None, None, 9.0]
        assert res.metrics["rewards/ProcessProbe/errors"] == 4.0
        assert res.metrics["reward/ProcessProbe/mean"] == 5.5
        assert res.total == [2.0, 0.0, 0.0, 0.0, 0.0, 9.0]
        assert runner.pool.restarts == 2  # the hung worker and the dead one were replaced
        again = runner(["abc", "hang"], k=[10, 0])  # the pool still works after the kills
        assert again.per_fn["ProcessProbe"] == [13.0, None]
    messages = [r.getMessage() for r in caplog.records]
    assert sum("ValueError: boom" in msg for msg in messages) == 1  # two failures, one traceback
    assert sum("RewardTimeout: no result within 1s" in msg for msg in messages) == 1
    assert sum("RewardWorkerDied" in msg and "code 3" in msg for msg in messages) == 1


def test_batch_function_failure_is_pinned_to_its_sample(probes):
    with RewardRunner(RewardConfig(functions=[fn(f"{probes}:picky")])) as runner:
        res = runner(["a", "bad", "ccc"])
    assert res.per_fn["picky"] == [1.0, None, 3.0]
    assert res.metrics["rewards/picky/errors"] == 1.0


def test_a_reward_failing_on_every_sample_batch_after_batch_stops_the_run(probes):
    """``picky`` fails on whole batches of "bad": twice in a row is tolerated (counted), a batch it scores resets
    the count, the third whole-batch failure in a row stops with its name and its first error."""
    from stagewise.rewards.runner import RewardFailedError

    with RewardRunner(RewardConfig(functions=[fn(f"{probes}:picky"), fn("format")], max_failed_steps=3)) as runner:
        for _ in range(2):
            assert runner(["bad", "bad"]).metrics["rewards/picky/errors"] == 2.0
        runner(["bad", "ok"])  # one sample scored: not broken
        runner(["bad", "bad"])
        runner(["bad", "bad"])
        with pytest.raises(RewardFailedError) as err:
            runner(["bad", "bad"])
    assert str(err.value) == ("reward 'picky' failed on every sample of 3 batches in a row "
                              "(reward.max_failed_steps=3); its first error: RuntimeError: cannot score 'bad'")


def test_thread_rewards_run_off_the_main_thread(probes):
    with RewardRunner(RewardConfig(functions=[fn(f"{probes}:ThreadProbe")])) as runner:
        assert runner(["a", "b", "c", "d"]).per_fn["ThreadProbe"] == [1.0] * 4


def test_pool_matches_serial_scoring():
    completions = ["\\boxed{4}", "The answer is $\\frac{1}{2}$", "\\boxed{0.5}", "nothing", "\\boxed{3} \\boxed{4}",
                   "<think>x</think> \\boxed{2\\sqrt{3}}", "", "\\boxed{x=4}"]
    golds = ["4", "0.5", "$\\frac12$", "4", "4", "2\\sqrt{3}", "1", "4"]
    expected_accuracy = [1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0]
    expected_boxed = [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]  # only one has </think>
    assert build("accuracy")(completions, answer=golds) == expected_accuracy
    cfg = RewardConfig(functions=[fn("accuracy"), fn("boxed_math")], num_workers=2)
    with RewardRunner(cfg) as runner:
        res = runner(completions, answer=golds)
    assert res.per_fn == {"accuracy": expected_accuracy, "boxed_math": expected_boxed}


def test_bad_batches_raise_with_the_column_named():
    with RewardRunner(RewardConfig(functions=[fn("format")])) as runner:
        with pytest.raises(ValueError, match="column 'solution' has 1 values for 2 completions"):
            runner(["a", "b"], solution=["4"])
        with pytest.raises(TypeError, match=r"completions\[1\] is a int"):
            runner(["a", 3])


def test_bad_function_fails_at_construction():
    with pytest.raises(KeyError, match="unknown reward 'nope'"):
        RewardRunner(RewardConfig(functions=[fn("nope")]))


# ------------------------------------------------------------------------------------------------ presets
def load_preset(name, num_workers=None):
    cfg = OmegaConf.merge(OmegaConf.structured(RewardConfig), OmegaConf.load(PRESETS / f"{name}.yaml"))
    if num_workers is not None:
        cfg.num_workers = num_workers  # each worker is a fresh interpreter: keep the unit tests light
    return cfg


PRESET_FUNCTIONS = {
    "r1_zero": [("accuracy", 1.0, {}), ("format", 1.0, {}), ("reasoning_steps", 1.0, {"num_steps": 3}),
                ("cosine", 1.0, {"min_value_wrong": -0.5, "max_value_wrong": -0.1, "min_value_correct": 0.8,
                                 "max_value_correct": 1.0, "max_len": 1000}),
                ("repetition_penalty", 1.0, {"ngram_size": 3, "max_penalty": -0.1})],
    "r1_reasoning": [("accuracy", 1.0, {}), ("format", 1.0, {}), ("language_consistency", 1.0, {"language": "en"})],
    "r1_utility": [("accuracy", 0.2, {}), ("format", 0.2, {}),
                   ("reward_model", 0.3, {"model": "models/utility_rm", "sigmoid": True, "answer_only": True,
                                          "batch_size": 8}),
                   ("reward_model", 0.3, {"model": "models/safety_rm", "sigmoid": True, "answer_only": False,
                                          "batch_size": 8})],
    "deepscaler": [("answer_tag", 1.0, {"correct_score": 1.0, "wrong_score": 0.0, "fallback_score": 0.5})],
    "countdown": [("countdown", 1.0, {"format_score": 0.1, "score": 1.0})],
    "none": [],
}


@pytest.mark.parametrize("preset", sorted(PRESET_FUNCTIONS))
def test_preset_files(preset):
    cfg = load_preset(preset)
    got = [(f.name, f.weight, OmegaConf.to_container(f.params)) for f in cfg.functions]
    assert got == PRESET_FUNCTIONS[preset]
    assert (PRESETS / f"{preset}.yaml").read_text().startswith("# @package reward\n")


def test_r1_zero_preset_scores():
    good = "<think>\nStep 1: 2+2\nStep 2: =4\nStep 3: done\n</think>\n<answer>\n\\boxed{4}\n</answer>"
    loop = "the cat the cat the cat"
    assert (len(good), len(loop)) == (81, 23)
    with RewardRunner(load_preset("r1_zero", num_workers=1)) as runner:
        res = runner([good, loop], solution=["4", "4"])
    cos_good = 0.8 + 0.1 * (1 + math.cos(math.pi * 81 / 1000))
    cos_loop = -0.1 - 0.2 * (1 + math.cos(math.pi * 23 / 1000))
    assert res.per_fn == {
        "accuracy": [1.0, 0.0], "format": [1.0, 0.0], "reasoning_steps": [1.0, 0.0],
        "cosine": [pytest.approx(cos_good), pytest.approx(cos_loop)],
        "repetition_penalty": [0.0, pytest.approx(-0.05)],  # 4 trigrams, 2 unique
    }
    assert res.total == [pytest.approx(3 + cos_good), pytest.approx(cos_loop - 0.05)]


def test_r1_reasoning_deepscaler_countdown_none_presets():
    with RewardRunner(load_preset("r1_reasoning", num_workers=1)) as runner:
        res = runner(["<think>I add two and two</think><answer>\\boxed{4}</answer>",
                      "<think>我 think</think><answer>5</answer>"], solution=["4", "5"])
    assert res.per_fn["language_consistency"] == [1.0, 0.5]
    assert res.total == [3.0, 1.5]  # 1 + 1 + 1 | 0 (no boxed/anchor) + 1 + 0.5
    with RewardRunner(load_preset("deepscaler")) as runner:
        res = runner(["<answer>1,234</answer>", "the answer is 1234", "<answer>7</answer>"], answer=["1234"] * 3)
    assert res.total == [1.0, 0.5, 0.0]
    with RewardRunner(load_preset("countdown")) as runner:
        res = runner(["<answer>(1+2)*3</answer>", "<answer>1+2+3</answer>", "nothing"], nums=[[1, 2, 3]] * 3,
                     target=[9, 9, 9])
    assert res.total == [1.0, 0.1, 0.0]
    with RewardRunner(load_preset("none")) as runner:
        res = runner(["a", "b"], prompt=["p", "q"])
    assert (res.total, res.per_fn) == ([0.0, 0.0], {})
    assert res.metrics == {"reward/total/mean": 0.0, "reward/total/std": 0.0, "reward/total/unscored": 0.0}
