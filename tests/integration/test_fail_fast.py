"""Mistakes a user makes on the command line stop `python train.py` within seconds, with the project's one-line
message (exit 1, no traceback) and nothing left behind: a hardware preset asking for GPUs the machine lacks, an
unknown key in every form (set, `+`, `--cfg job`), a malformed data row (named by file and 1-based line)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import run_train, train_py_in_process
from stagewise.launch import HardwareMismatchError, check_hardware

NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}  # torch.cuda.device_count() == 0 on any machine
TYPO = ("Error: unknown config key stage.learning_rte (not a field of SFTStage, the schema of stage=sft; did you mean "
        "stage.learning_rate?)\n")


def _timed(args, tmp_path: Path, env=None):
    start = time.monotonic()
    proc = run_train(args, cwd=tmp_path, timeout=120, env=env)
    return proc, time.monotonic() - start


def _nothing_left(tmp_path: Path, proc) -> None:
    assert not (tmp_path / "outputs").exists(), list((tmp_path / "outputs").rglob("*"))
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "relaunching" not in proc.stderr + proc.stdout  # no torchrun, no worker process


@pytest.mark.parametrize("preset,asks", [("8xa100", "8 GPU processes"), ("1xgpu", "1 GPU process")])
def test_gpu_preset_without_a_gpu_stops_before_any_process(tmp_path, preset, asks):
    proc, took = _timed(["stage=sft", "data=tiny_sft", f"hardware={preset}"], tmp_path, env=NO_GPU)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == (f"Error: hardware={preset} asks for {asks}, but this machine has no CUDA device "
                           "(torch.cuda.device_count() == 0); use hardware=cpu or hardware=cpu_2proc\n")
    _nothing_left(tmp_path, proc)
    assert took < 30, f"took {took:.1f}s"  # ~2 s on an idle 2-core machine (Hydra compose + torch import)


def test_gpu_preset_stops_a_pipeline_before_its_first_stage(tmp_path):
    proc, _ = _timed(["hardware=8xa100"], tmp_path, env=NO_GPU)  # the default pipeline=tiny
    assert proc.returncode == 1
    assert proc.stderr.startswith("Error: hardware=8xa100 asks for 8 GPU processes, but this machine has no CUDA")
    _nothing_left(tmp_path, proc)


def test_more_processes_than_devices_is_refused_naming_both():
    hw = OmegaConf.create({"cpu": False, "num_processes": 8})
    with pytest.raises(HardwareMismatchError) as err:
        check_hardware(hw, "8xa100", environ={}, device_count=lambda: 1)
    assert str(err.value) == ("hardware=8xa100 asks for 8 GPU processes, but this machine has 1 CUDA device "
                              "(torch.cuda.device_count() == 1); set hardware.num_processes=1 or use hardware=1xgpu")
    check_hardware(hw, "8xa100", environ={}, device_count=lambda: 8)  # enough devices
    check_hardware(hw, "8xa100", environ={"LOCAL_RANK": "0"}, device_count=lambda: 1)  # a rank: the launcher chose
    cpu = OmegaConf.create({"cpu": True, "num_processes": 2})  # CPU presets are never refused (cpu_2proc, 2 cores)
    check_hardware(cpu, "cpu_2proc", environ={}, device_count=lambda: 0)


# The config errors below are checked on train.py run in this process (`train_py_in_process`: the same __main__
# code without an interpreter start); the GPU-preset and bad-row errors above and below run it as a subprocess.
@pytest.mark.parametrize("args", [
    ["stage=sft", "data=tiny_sft", "stage.learning_rte=1e-3"],
    ["stage=sft", "data=tiny_sft", "+stage.learning_rte=1e-3"],
    ["stage=sft", "stage.learning_rte=1e-3", "--cfg", "job"],
], ids=["set", "append", "cfg_job"])
def test_unknown_key_in_every_form_gives_the_projects_one_line_error(tmp_path, args, monkeypatch, capsys):
    proc = train_py_in_process(args, tmp_path, monkeypatch, capsys)
    assert proc.returncode == 1
    assert proc.stderr == TYPO
    assert proc.stdout == ""  # --cfg job prints nothing invalid
    _nothing_left(tmp_path, proc)


def test_unknown_key_of_a_plain_node_is_the_projects_error_too(tmp_path, monkeypatch, capsys):
    proc = train_py_in_process(["stage=sft", "hardware.num_proceses=2"], tmp_path, monkeypatch, capsys)
    assert proc.returncode == 1
    assert proc.stderr == ("Error: unknown config key hardware.num_proceses (not a field of HardwareConfig; did you "
                           "mean hardware.num_processes?)\n")


def test_unknown_top_level_key_is_the_projects_error_not_hydras(tmp_path, monkeypatch, capsys):
    """Hydra would say "Could not override 'sed'. To append to your config use +sed=1" (the wrong fix)."""
    proc = train_py_in_process(["sed=1"], tmp_path, monkeypatch, capsys)
    assert proc.returncode == 1
    assert proc.stderr == "Error: unknown config key sed (not a field of TrainConfig; did you mean seed?)\n"
    _nothing_left(tmp_path, proc)
    proc = train_py_in_process(["seed=3", "task_name=mine", "--cfg", "job"], tmp_path, monkeypatch, capsys)
    assert proc.returncode == 0 and "seed: 3" in proc.stdout and "task_name: mine" in proc.stdout


def test_a_valid_cfg_job_still_prints(tmp_path, monkeypatch, capsys):
    proc = train_py_in_process(["stage=sft", "stage.learning_rate=1e-3", "--cfg", "job"], tmp_path, monkeypatch,
                               capsys)
    assert proc.returncode == 0, proc.stderr
    assert "learning_rate: 0.001" in proc.stdout


def test_malformed_jsonl_row_is_one_short_error_with_its_line(tmp_path):
    rows = [json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                     {"role": "assistant", "content": f"a{i}"}]}) for i in range(10)]
    rows[7] = rows[7][:-3]  # truncated: the 8th line of the file
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(rows) + "\n")
    proc, _ = _timed(["stage=sft", "data=tiny_sft", f"data.sources=[{{path: {data}}}]", "data.eval_sources=[]",
                      "stage.max_steps=1"], tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.endswith(f"Error: {data}: line 8: field '<json>': invalid JSON: Expecting ',' delimiter at "
                                "column 87 (set data.on_bad_row=skip to skip bad rows)\n")
    assert "Traceback" not in proc.stderr and "row 7" not in proc.stderr + proc.stdout
