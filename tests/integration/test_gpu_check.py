"""benchmarks/gpu/check.sh --dry-run: the one-shot GPU check's CPU-runnable paths (our SFT step on
packed bins, our GRPO stage and TRL's GRPOTrainer on the same saved Qwen2-shaped model) run in a tiny shape and
print the table, with every measured number positive and finite; plus the MFU helpers."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess

import pytest

from conftest import REPO

CHECK = REPO / "benchmarks" / "gpu" / "check.py"
spec = importlib.util.spec_from_file_location("gpu_check", CHECK)
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)

pytest.importorskip("trl")


def table_rows(stdout: str) -> dict[str, dict[str, str]]:
    lines = [l for l in stdout.splitlines() if l.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return {cells[0]: dict(zip(header, cells)) for cells in
            ([c.strip() for c in l.strip("|").split("|")] for l in lines[1:])}


def positive(cell: str) -> float:
    x = float(cell.rstrip("x%"))
    assert math.isfinite(x) and x > 0, cell
    return x


def test_dry_run_prints_every_row_with_positive_finite_numbers(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    out = subprocess.run(["bash", str(CHECK.with_suffix(".sh")), "--dry-run", "--json", str(tmp_path / "r.json")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = table_rows(out.stdout)
    assert list(rows) == ["sft packed", "sft packed + liger", "grpo ours (hf)", "grpo trl (hf)"], out.stdout

    sft = rows["sft packed"]
    assert sft["note"] == "", sft
    positive(sft["s/step"]), positive(sft["tokens/s"])
    assert sft["MFU"] == sft["MFU+attn"] == "n/a" and sft["peak GiB"] == "n/a"  # CPU
    liger = rows["sft packed + liger"]
    assert liger["s/step"] == "-" and liger["note"] in ("not installed", "skipped (dry run: Liger needs CUDA)")
    for name in ("grpo ours (hf)", "grpo trl (hf)"):
        assert rows[name]["note"] == "", rows[name]
        positive(rows[name]["s/step"])
    positive(rows["grpo ours (hf)"]["vs TRL"])
    assert "Targets (this project's goals)" in out.stdout

    result = json.loads((tmp_path / "r.json").read_text())
    by_row = {r["row"]: r for r in result["rows"]}
    s = by_row["sft packed"]
    assert 0 < s["tokens_per_step"] <= 2 * 256  # two bins of at most 256 tokens per step
    assert len(s["losses"]) == 3 and all(math.isfinite(x) and x > 0 for x in s["losses"])
    assert s["params"] > 0 and s["attn_flops_per_s"] > 0 and not s["liger_applied"]
    assert by_row["grpo ours (hf)"]["mean_length"] <= 8
    assert len(by_row["grpo trl (hf)"]["steps_s"]) == 2


def test_mfu_helpers():
    assert check.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert check.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert check.peak_flops("NVIDIA H200") == 989e12
    assert check.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert check.peak_flops("NVIDIA L4") is None
    assert check.doc_lengths([0, 1, 2, 0, 1, 0]) == [3, 2, 1]
