"""RL prompt datasets: conversation from problem/prompt/messages, system prompt rules, length filter, passthrough."""

from __future__ import annotations

from pathlib import Path

import pytest

from stagewise.config import R1_ZERO_SYSTEM_PROMPT, DataConfig, SourceConfig
from stagewise.data import load_prompt_dataset
from stagewise.models import tiny_tokenizer

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "data"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def src(name, **kw):
    return SourceConfig(path=name if name.startswith("generator:") else str(FIX / name), **kw)


def test_problem_rows_get_r1_zero_system_prompt_and_generation_prompt(tok):
    data = load_prompt_dataset(DataConfig(sources=[src("deepscaler.parquet")], seed=0), tok,
                               system_prompt=R1_ZERO_SYSTEM_PROMPT)
    row = next(r for r in data.train if r["answer"] == "6")
    assert row["messages"] == [{"role": "system", "content": R1_ZERO_SYSTEM_PROMPT},
                               {"role": "user", "content": "Compute $1+2+3$."}]
    assert row["prompt"] == (f"<|im_start|>system\n{R1_ZERO_SYSTEM_PROMPT}<|im_end|>\n"
                             "<|im_start|>user\nCompute $1+2+3$.<|im_end|>\n<|im_start|>assistant\n")
    assert row["prompt_ids"] == tok.encode(row["prompt"], add_special_tokens=False)
    assert row["prompt_length"] == len(row["prompt_ids"])
    assert row["solution"] == "$1+2+3=6$." and row["source"] == "deepscaler"
    assert data.stats["train"].rows_out == 3 and data.eval is None


def test_system_prompt_precedence(tok):
    """data.system_prompt replaces the data's own; a caller default only fills conversations that have none."""
    cfg = DataConfig(sources=[src("bespoke_stratos.parquet"), src("prompt_completion.jsonl")])
    rows = load_prompt_dataset(cfg, tok, system_prompt="DEFAULT").train
    systems = {r["source"]: r["messages"][0]["content"] for r in rows}
    assert systems["bespoke_stratos"].startswith("Your role as an assistant")
    assert systems["prompt_completion"] == "DEFAULT"
    cfg.system_prompt = "CONFIG"
    rows = load_prompt_dataset(cfg, tok, system_prompt="DEFAULT").train
    assert {r["messages"][0]["content"] for r in rows} == {"CONFIG"}
    cfg.system_prompt = ""  # explicitly none, and the caller default does not come back
    rows = load_prompt_dataset(cfg, tok, system_prompt="DEFAULT").train
    assert all(r["messages"][0]["role"] == "user" and r["prompt"].startswith("<|im_start|>user\n") for r in rows)


def test_conversation_is_cut_before_the_first_assistant_message(tok):
    rows = load_prompt_dataset(DataConfig(sources=[src("messages.jsonl"), src("numina_tir.parquet")]), tok).train
    by_id = {r["id"]: r for r in rows if r["source"] == "messages"}
    assert by_id[0]["messages"] == [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]
    numina = [r for r in rows if r["source"] == "numina_tir"]
    assert all(r["messages"] == [{"role": "user", "content": r["problem"]}] for r in numina)
    assert all(r["prompt"].endswith("<|im_start|>assistant\n") for r in rows)


def test_countdown_and_deepanalyze_rl_passthrough(tok):
    cfg = DataConfig(sources=[src("countdown.parquet"), src("deepanalyze_rl.parquet")], max_prompt_length=4096)
    rows = load_prompt_dataset(cfg, tok).train
    cd = {r["target"]: r for r in rows if r["source"] == "countdown"}
    assert cd[98]["nums"] == [44, 19, 35] and "Using the numbers [44, 19, 35]" in cd[98]["prompt"]
    da = [r for r in rows if r["source"] == "deepanalyze_rl"]
    assert {r["reward_spec"]["method"] for r in da} == {"datatask", "qa"}
    assert {r["workspace_id"] for r in da} == {"ws_001", ""}


def test_prompts_over_max_prompt_length_are_dropped_and_counted(tok, tmp_path):
    import json

    words = [1, 3, 40, 2, 60]  # prompts of 1..60 repeated words; the 40- and 60-word ones are too long
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": " ".join(["sales"] * k), "k": k}) + "\n"
                                              for k in words))
    short = tok.apply_chat_template([{"role": "user", "content": "sales"}], add_generation_prompt=True)["input_ids"]
    # <|im_start|> us er \n sales <|im_end|> \n <|im_start|> as s ist an t \n
    assert len(short) == 14
    cfg = DataConfig(sources=[SourceConfig(path=str(tmp_path / "p.jsonl"))], max_prompt_length=30)
    data = load_prompt_dataset(cfg, tok)
    st = data.stats["train"]
    assert (st.rows_in, st.rows_out, st.too_long_dropped, st.no_user_dropped) == (5, 3, 2, 0)
    assert sorted(data.train["k"]) == [1, 2, 3]
    assert sorted(data.train["prompt_length"]) == [14, 15, 16]  # each extra " sales" is one token (40 -> 53)
    cfg.max_prompt_length = 13
    with pytest.raises(ValueError, match=r"no prompts left: .*too_long_dropped=5"):
        load_prompt_dataset(cfg, tok)


def test_held_out_prompts(tok):
    cfg = DataConfig(sources=[src("generator:arithmetic", generator_kwargs={"n": 50})],
                     eval_sources=[src("generator:arithmetic", split="test", generator_kwargs={"n": 20})])
    data = load_prompt_dataset(cfg, tok)
    assert (len(data.train), len(data.eval)) == (50, 20)
    assert not set(data.train["problem"]) & set(data.eval["problem"])
    assert all(r["answer"] == str(eval(r["problem"][len("What is "):-1])) for r in data.eval)
