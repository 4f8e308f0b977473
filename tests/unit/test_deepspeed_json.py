"""DeepSpeed JSON templates filled from the config: autos, mismatches, leftovers, and DeepSpeed's own schema."""

from __future__ import annotations

import json

import pytest

from conftest import compose
from stagewise.training.deepspeed_json import (
    HIDDEN_SIZE_KEYS,
    TEMPLATE_DIR,
    Value,
    build_deepspeed_config,
    fill,
    load_template,
    template_path,
)


def test_fill_rules():
    template = {"a": "auto", "b": 2, "c": {"d": "auto"}, "keep": "auto"}
    values = {"a": Value(1, "x.a"), "b": Value(2, "x.b"), "c.d": Value(True, "x.d"), "new.key": Value(5, "x.n"),
              "skipped": Value(9, "x.s", absent="skip"), "default_off": Value(0.0, "x.c", absent=0.0),
              "default_on": Value(1.0, "x.c", absent=0.0)}
    out = fill(template, values, allow_auto=("keep",))
    assert out == {"a": 1, "b": 2, "c": {"d": True}, "keep": "auto", "new": {"key": 5}, "default_on": 1.0}
    assert template["a"] == "auto"  # the template is not modified


def test_fill_names_every_mismatch_and_leftover_auto():
    with pytest.raises(ValueError) as e:
        fill({"a": 3, "b": {"c": 4}}, {"a": Value(1, "hardware.x"), "b.c": Value(5, "stage.y")}, name="t.json")
    msg = str(e.value)
    assert "a=3 in t.json, but hardware.x gives 1" in msg and "b.c=4 in t.json, but stage.y gives 5" in msg
    with pytest.raises(ValueError, match=r"t.json: nothing fills \"auto\" for \['z.w'\]"):
        fill({"z": {"w": "auto"}}, {}, name="t.json")


@pytest.mark.parametrize("overrides, name, offload", [
    (["hardware.deepspeed.zero_stage=2"], "zero2.json", (None, None)),
    (["hardware.deepspeed.zero_stage=2", "hardware.deepspeed.offload_optimizer=true"], "zero2_offload.json",
     ("cpu", None)),
    (["hardware.deepspeed.zero_stage=3"], "zero3.json", (None, None)),
    (["hardware.deepspeed.zero_stage=3", "hardware.deepspeed.offload_optimizer=true"], "zero3_offload.json",
     ("cpu", "none")),
    (["hardware.deepspeed.zero_stage=3", "hardware.deepspeed.offload_optimizer=true",
      "hardware.deepspeed.offload_params=true"], "zero3_offload.json", ("cpu", "cpu")),
])
def test_shipped_templates_filled_from_config(overrides, name, offload):
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    cfg = compose(["hardware=8xa100", "stage.max_grad_norm=0.5", *overrides])
    stage = cfg.hardware.deepspeed.zero_stage
    assert template_path(stage, cfg.hardware.deepspeed.offload_optimizer,
                         cfg.hardware.deepspeed.offload_params).name == name
    ds = build_deepspeed_config(cfg, world_size=16, hidden_size=192)
    # 8xa100: micro 8, accum 4, bf16; 16 processes
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 16 * 8 * 4 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True} and ds["fp16"]["enabled"] is False
    zo = ds["zero_optimization"]
    assert zo["stage"] == stage and zo["reduce_bucket_size"] == 192 * 192
    assert (zo.get("offload_optimizer", {}).get("device"), zo.get("offload_param", {}).get("device")) == offload
    if stage == 3:
        assert zo["stage3_prefetch_bucket_size"] == int(0.9 * 192 * 192)
        assert zo["stage3_param_persistence_threshold"] == 1920
        assert zo["stage3_gather_16bit_weights_on_model_save"] is True
    assert "auto" not in json.dumps(ds)
    # DeepSpeed's own (extra="forbid") schemas accept every key
    DeepSpeedZeroConfig(**zo)
    DeepSpeedBF16Config(**ds["bf16"])
    DeepSpeedFP16Config(**ds["fp16"])


def test_without_hidden_size_the_bucket_autos_are_left_for_accelerate():
    cfg = compose(["hardware=8xa100"])
    ds = build_deepspeed_config(cfg, world_size=8, mixed_precision="no")
    zo = ds["zero_optimization"]
    assert [k for k in HIDDEN_SIZE_KEYS if zo.get(k.split(".")[1]) == "auto"] == list(HIDDEN_SIZE_KEYS)
    assert ds["bf16"] == {"enabled": False}  # the CPU downgrade passed by the accelerator wins


def test_explicit_template_mismatch_and_bad_choices(tmp_path):
    cfg = compose(["hardware=8xa100"])  # ZeRO-3
    with pytest.raises(ValueError, match=r"zero_optimization.stage=2 in .*zero2.json, but "
                                         r"hardware.deepspeed.zero_stage gives 3"):
        build_deepspeed_config(cfg, world_size=8, template=TEMPLATE_DIR / "zero2.json")
    custom = tmp_path / "mine.json"
    custom.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": "auto"}}))
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=2 in .*mine.json, but "
                                         "hardware.per_device_batch_size gives 8"):
        build_deepspeed_config(cfg, world_size=8, template=custom)
    custom.write_text("{not json")
    with pytest.raises(ValueError, match="mine.json is not valid JSON"):
        load_template(custom)
    with pytest.raises(ValueError, match="needs hardware.deepspeed.zero_stage=3"):
        template_path(2, offload_params=True)
    with pytest.raises(ValueError, match="zero_stage=1"):
        template_path(1)
