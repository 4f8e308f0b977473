"""Preemption: a real signal sets the flag, the step boundary saves and exits 75, handlers chain."""

from __future__ import annotations

import os
import signal

import pytest

from stagewise.training import preemption


@pytest.fixture
def handler():
    preemption.uninstall_preemption_handler()
    h = preemption.install_preemption_handler()
    yield h
    preemption.uninstall_preemption_handler()


def test_signal_sets_flag_then_boundary_saves_and_exits(handler):
    saved = []
    preemption.checkpoint_and_exit_if_preempted(None, lambda: saved.append("ckpt"))
    assert saved == [] and not preemption.should_checkpoint_and_exit()
    os.kill(os.getpid(), signal.SIGUSR1)
    assert handler.received == signal.SIGUSR1 and preemption.should_checkpoint_and_exit()
    with pytest.raises(SystemExit) as e:
        preemption.checkpoint_and_exit_if_preempted(None, lambda: saved.append("ckpt"))
    assert e.value.code == preemption.REQUEUE_EXIT_CODE == 75
    assert saved == ["ckpt"]


def test_sigterm_too_and_uninstall_restores(handler):
    os.kill(os.getpid(), signal.SIGTERM)
    assert handler.received == signal.SIGTERM
    preemption.uninstall_preemption_handler()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # what it was before install
    assert not preemption.should_checkpoint_and_exit()


def test_previous_handler_runs_after_the_checkpoint():
    """Under submitit the replaced handler is submitit's requeue: it must run, after our save."""
    preemption.uninstall_preemption_handler()
    calls = []
    old = signal.signal(signal.SIGUSR1, lambda s, f: calls.append(("previous", s)))
    try:
        preemption.install_preemption_handler()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert calls == []  # not called from the signal: only the flag is set
        with pytest.raises(SystemExit) as e:
            preemption.checkpoint_and_exit_if_preempted(None, lambda: calls.append(("save", None)))
        assert calls == [("save", None), ("previous", signal.SIGUSR1)] and e.value.code == 75
    finally:
        preemption.uninstall_preemption_handler()
        signal.signal(signal.SIGUSR1, old)


def test_ctrl_c_checkpoints_like_sigterm_and_a_second_ctrl_c_stops_at_once(handler, capfd):
    os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: a checkpoint at the next step boundary
    assert handler.received == signal.SIGINT and preemption.should_checkpoint_and_exit()
    assert "got SIGINT: will checkpoint at the next step boundary" in capfd.readouterr().err
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)


def test_submitit_signal_is_handled_too(monkeypatch):
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    assert preemption.PreemptionHandler().signals == [signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGUSR2]
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "USR1")
    assert preemption.PreemptionHandler().signals == [signal.SIGUSR1, signal.SIGTERM, signal.SIGINT]
    monkeypatch.delenv("SUBMITIT_EXECUTOR")
    assert preemption.submitit_preempt_signal() is None
