"""What runs printed that they should not: every INFO line once per rank and DeepSpeed's deprecation warnings on 2
processes, "0.00M params" under ZeRO-3, six INFO lines per checkpoint."""

from __future__ import annotations

import logging
import warnings

import torch

from stagewise.models.loading import num_params
from stagewise.tracking.logs import quiet_library_deprecations, quiet_other_ranks_console


def test_only_rank_0_prints_info_to_the_terminal(tmp_path, monkeypatch):
    root = logging.getLogger()
    console, file = logging.StreamHandler(), logging.FileHandler(tmp_path / "train.rank1.log")
    for handler in (console, file):
        root.addHandler(handler)
    try:
        monkeypatch.setenv("RANK", "0")
        quiet_other_ranks_console()
        assert console.level == logging.NOTSET
        monkeypatch.setenv("RANK", "1")
        quiet_other_ranks_console()
        assert console.level == logging.WARNING and file.level == logging.NOTSET  # its own log file keeps all
    finally:
        for handler in (console, file):
            root.removeHandler(handler)
        file.close()


def test_dependency_deprecations_are_quiet_and_ours_are_not():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_library_deprecations()
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated", FutureWarning)
        warnings.warn("`torch.distributed.reduce_op` is deprecated, please use ReduceOp", FutureWarning)
        warnings.warn("stagewise.thing is deprecated", FutureWarning)
    assert [str(w.message) for w in caught] == ["stagewise.thing is deprecated"]


def test_parameter_count_under_zero3_is_the_full_size():
    model = torch.nn.Linear(10, 20)
    assert num_params(model) == 220
    for p in model.parameters():  # what ZeRO-3 leaves on a rank: an empty shard, the full size in ds_numel
        p.ds_numel = p.numel()
        p.data = torch.empty(0)
    assert num_params(model) == 220


def test_a_checkpoint_save_is_not_a_screenful_of_info_lines(tmp_path, caplog):
    from accelerate import Accelerator

    from stagewise.config import ModelConfig
    from stagewise.models import load_model_and_tokenizer
    from stagewise.run_folder import RunFolder
    from stagewise.training.checkpoint import CheckpointManager, TrainState

    model, tok = load_model_and_tokenizer(ModelConfig())
    acc = Accelerator(cpu=True)
    model, optimizer = acc.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    with caplog.at_level(logging.INFO):
        path = CheckpointManager(acc, RunFolder(tmp_path), keep_last=1).save(TrainState(step=3), model, tok)
    assert (path / "COMPLETE").exists()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO] == [f"checkpoint saved: {path}"]
