"""Every reward, plain function or class, inline, thread or process, runs under
``reward.timeout_s``; a timeout or an exception gives None for that sample, is counted in ``rewards/<fn>/errors``
and ``rewards/<fn>/timeouts``, and the batch goes on."""

from __future__ import annotations

import textwrap
import time

import pytest

from stagewise.config import RewardConfig, RewardFnConfig
from stagewise.rewards import RewardRunner

SLOW = textwrap.dedent("""
    import time
    from stagewise.rewards import SampleReward

    def sleepy(completions, **columns):          # a user's plain function
        if "slow" in completions:
            time.sleep(30)
        return [float(len(c)) for c in completions]

    class InlineSleepy(SampleReward):            # executor inline (the default)
        def per_sample(self, completion, row):
            if completion == "slow":
                time.sleep(30)
            if completion == "boom":
                raise ValueError("boom")
            return float(len(completion))

    class ThreadSleepy(InlineSleepy):
        executor = "thread"
        concurrency = 2

    class ProcessSleepy(InlineSleepy):
        executor = "process"
""")


@pytest.fixture
def slow(tmp_path):
    path = tmp_path / "slow.py"
    path.write_text(SLOW)
    return path


def runner(spec, timeout_s=1.0):
    return RewardRunner(RewardConfig(functions=[RewardFnConfig(name=spec)], timeout_s=timeout_s, num_workers=2))


@pytest.mark.parametrize("cls", ["InlineSleepy", "ThreadSleepy", "ProcessSleepy"])
def test_sample_rewards_time_out_per_sample(slow, cls):
    with runner(f"{slow}:{cls}") as r:
        if cls == "ProcessSleepy":
            r(["warm"])  # start the pool outside the timed part (its start-up is not a sample's time)
        t0 = time.monotonic()
        res = r(["ab", "slow", "boom", "abcd"])
        took = time.monotonic() - t0
    assert res.per_fn[cls] == [2.0, None, None, 4.0]
    assert res.metrics[f"rewards/{cls}/errors"] == 2.0  # the timeout and the exception
    assert res.metrics[f"rewards/{cls}/timeouts"] == 1.0
    assert res.failed[cls] == [False, True, True, False] and res.timed_out[cls] == [False, True, False, False]
    assert res.sample_flags()[f"rewards/{cls}/timeouts"] == [0.0, 1.0, 0.0, 0.0]
    assert took < 20, took  # bounded by timeout_s, not the 30 s sleep


def test_plain_function_is_bounded(slow):
    with runner(f"{slow}:sleepy", timeout_s=1.0) as r:
        t0 = time.monotonic()
        res = r(["ab", "slow", "abc"])
        took = time.monotonic() - t0
        assert took < 20, took
        assert res.per_fn["sleepy"] == [None, None, None]  # a batch call: its timeout has no single sample to blame
        assert res.metrics["rewards/sleepy/errors"] == 3.0 and res.metrics["rewards/sleepy/timeouts"] == 3.0
        ok = r(["ab", "abc"])  # the next batch scores normally
        assert ok.per_fn["sleepy"] == [2.0, 3.0] and ok.metrics["rewards/sleepy/timeouts"] == 0.0
