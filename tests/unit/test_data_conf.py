"""conf/data/*.yaml: each preset is a valid `DataConfig` and names known adapters and generators."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from stagewise.config import DataConfig, TrainConfig
from stagewise.data import ADAPTERS, GENERATORS

CONF = Path(__file__).resolve().parents[2] / "conf" / "data"
PRESETS = sorted(p.name for p in CONF.glob("*.yaml"))


def test_presets_exist():
    assert {"tiny_sft.yaml", "tiny_grpo.yaml", "countdown.yaml", "countdown_tiny.yaml", "numina_tir.yaml",
            "bespoke_stratos.yaml", "deepscaler.yaml", "deepanalyze_rl.yaml"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_matches_schema(name):
    text = (CONF / name).read_text()
    assert text.startswith("# @package data") or name == "none.yaml"
    # merged into the whole schema so that ${paths.*} resolves; unknown keys or wrong types raise here
    merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), {"data": OmegaConf.create(text)}).data
    for src in list(merged.sources) + list(merged.eval_sources):
        assert src.adapter == "auto" or src.adapter in ADAPTERS
        if src.path.startswith("generator:"):
            assert src.path.split(":", 1)[1] in GENERATORS


def test_tiny_presets_share_the_system_prompt_and_fit_their_lengths():
    from stagewise.data import load_prompt_dataset, load_sources, tokenize_sft
    from stagewise.models import tiny_tokenizer

    sft = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(CONF / "tiny_sft.yaml"))
    grpo = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(CONF / "tiny_grpo.yaml"))
    assert sft.system_prompt == grpo.system_prompt and sft.system_prompt
    assert len(grpo.eval_sources) == 1 and grpo.eval_sources[0].generator_kwargs.n >= 200
    # nothing of a small sample is dropped for length
    for c in (sft, grpo):
        c.sources[0].generator_kwargs.n = 50
        c.eval_sources[0].generator_kwargs.n = 10
    tok = tiny_tokenizer()
    _, stats = tokenize_sft(load_sources(sft).train, tok, sft, use_cache=False)
    assert (stats.rows_out, stats.overlong_dropped) == (50, 0)
    prompts = load_prompt_dataset(grpo, tok)
    assert prompts.stats["train"].too_long_dropped == 0 and len(prompts.eval) == 10


R1_ZERO_STYLE = ["countdown", "countdown_tiny", "deepscaler", "numina_tir"]


@pytest.mark.parametrize("name", R1_ZERO_STYLE)
def test_r1_zero_style_data_carry_the_r1_zero_prompt_in_yaml(name):
    """The system prompt is data config, not stage code: every stage (SFT's in-loop eval included) reads it."""
    from stagewise.config import R1_ZERO_SYSTEM_PROMPT

    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(CONF / f"{name}.yaml"))
    assert cfg.system_prompt == R1_ZERO_SYSTEM_PROMPT


def test_prompts_get_the_data_system_prompt_with_no_default_from_code():
    from stagewise.config import R1_ZERO_SYSTEM_PROMPT
    from stagewise.data import load_prompt_dataset
    from stagewise.models import tiny_tokenizer

    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(CONF / "countdown_tiny.yaml"))
    cfg.sources[0].generator_kwargs.n = 4
    cfg.eval_sources[0].generator_kwargs.n = 2
    data = load_prompt_dataset(cfg, tiny_tokenizer())  # as GRPO, eval and rejection sampling call it
    for split in (data.train, data.eval):
        assert {row["messages"][0]["content"] for row in split} == {R1_ZERO_SYSTEM_PROMPT}
    cfg.system_prompt = ""  # the YAML default is a plain field: "" turns it off
    assert load_prompt_dataset(cfg, tiny_tokenizer()).train[0]["messages"][0]["role"] == "user"
