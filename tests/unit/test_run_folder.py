"""A run folder holding a finished run: ``resume=never`` refuses it in one line, ``resume=overwrite`` deletes what the
old run left before the new one starts, ``resume=auto`` keeps it (two runs never mix in one metrics.jsonl)."""

from __future__ import annotations

import pytest

from conftest import run_train
from stagewise.run_folder import RunFolder, RunFolderInUseError


def finished_run(root):
    run = RunFolder(root)
    for step in (20, 25):
        run.checkpoint(step).mkdir(parents=True)
        (run.checkpoint(step) / "COMPLETE").touch()
    run.final.mkdir()
    run.metrics.write_text('{"step": 30}\n')
    run.samples.mkdir()
    run.sample_file(20).write_bytes(b"x")
    (run.root / "train.log").write_text("old log\n")
    return run


def test_never_refuses_a_folder_holding_a_run_and_names_what_it_holds(tmp_path):
    run = finished_run(tmp_path)
    with pytest.raises(RunFolderInUseError) as err:
        run.prepare_for("never")
    message = str(err.value)
    assert str(tmp_path) in message and "checkpoints/step_20, checkpoints/step_25, final/, metrics.jsonl, samples/" \
        in message and "resume=overwrite" in message
    assert run.previous_run() == ["checkpoints/step_20", "checkpoints/step_25", "final/", "metrics.jsonl", "samples/"]


def test_overwrite_deletes_the_old_run_first_and_auto_keeps_it(tmp_path):
    run = finished_run(tmp_path)
    run.prepare_for("auto")
    assert run.latest_checkpoint() == run.checkpoint(25)
    run.prepare_for("overwrite")
    assert run.previous_run() == [] and run.latest_checkpoint() is None and not run.metrics.exists()
    assert (tmp_path / "train.log").read_text() == "old log\n"  # the log keeps both attempts
    RunFolder(tmp_path / "empty").prepare_for("never")  # nothing to mix with: a fresh folder is fine


def test_train_py_stops_in_one_line_before_loading_anything(tmp_path):
    run = finished_run(tmp_path / "outputs" / "tiny_grpo" / "X")
    proc = run_train(["experiment=tiny/grpo", "run_id=X", "resume=never"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "already holds a run" in errors[0] and "Traceback" not in proc.stderr
    assert run.latest_checkpoint() == run.checkpoint(25) and run.metrics.read_text() == '{"step": 30}\n'


def test_a_run_is_finished_once_it_wrote_final_or_its_result(tmp_path):
    from stagewise.run_folder import RunFolder

    folder = RunFolder(tmp_path / "run")
    folder.final.mkdir(parents=True)
    assert not folder.finished()  # an interrupted save: no config yet
    (folder.final / "config.json").write_text("{}")
    assert folder.finished()
    other = RunFolder(tmp_path / "eval_run")
    other.root.mkdir()
    assert not other.finished()
    (other.root / "result.json").write_text("{}")
    assert other.finished()
