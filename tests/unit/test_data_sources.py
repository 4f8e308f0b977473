"""Sources: each fixture with its real schema through its adapter, auto-detection, bad rows."""

from __future__ import annotations

from pathlib import Path

import pytest

from stagewise.config import DataConfig, SourceConfig
from stagewise.data import BadRowError, detect_adapter, load_source
from stagewise.data.sources.chat import prompt_completion_adapter
from stagewise.data.sources.countdown import countdown_prompt
from stagewise.data.sources.readers import source_kind, source_stem

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "data"
DA_PROMPT = ('# Instruction\nWhich region has the highest total sales?\n\n# Data\nFile 1:\n'
             '{"name": "sales.csv", "size": "10.6KB"}')


def load(name, _data=None, **src):
    return load_source(SourceConfig(path=str(FIX / name), **src), DataConfig(**(_data or {})))


def U(c):
    return {"role": "user", "content": c}


def A(c):
    return {"role": "assistant", "content": c}


@pytest.mark.parametrize(
    "fixture, adapter, rows, columns",
    [
        ("deepanalyze_single.jsonl", "messages", 3, ["messages", "source"]),
        ("deepanalyze_interaction.jsonl", "messages", 3, ["messages", "source"]),
        ("deepanalyze_interaction.json", "messages", 3, ["messages", "source"]),
        ("messages.jsonl", "messages", 3, ["id", "messages", "source"]),
        ("prompt_completion.jsonl", "prompt_completion", 3, ["answer", "messages", "source"]),
        ("bespoke_stratos.parquet", "bespoke_stratos", 2, ["messages", "source"]),
        ("numina_tir.parquet", "numina_tir", 2, ["messages", "problem", "solution", "source"]),
        ("deepscaler.parquet", "numina_tir", 3, ["answer", "messages", "problem", "solution", "source"]),
        ("countdown.parquet", "countdown", 3, ["messages", "nums", "problem", "source", "target"]),
        ("deepanalyze_rl.parquet", "deepanalyze_rl", 2,
         ["data", "data_source", "env_class", "input_seq", "messages", "reward_spec", "source", "workspace_id"]),
        ("arrow_messages", "messages", 2, ["answer", "messages", "source"]),
    ],
)
def test_auto_adapter_on_each_fixture(fixture, adapter, rows, columns):
    ds, rep = load(fixture)
    assert (rep.adapter, len(ds), sorted(ds.column_names)) == (adapter, rows, columns)
    assert (rep.rows_read, rep.rows_kept, rep.rows_skipped, rep.rows_used) == (rows, rows, 0, rows)
    assert set(ds["source"]) == {source_stem(str(FIX / fixture))}


def test_deepanalyze_interaction_rows_keep_trajectory_and_execute_role():
    ds, rep = load("deepanalyze_interaction.jsonl", adapter="deepanalyze")
    assert rep.adapter == "deepanalyze"
    first = ds[0]["messages"]
    assert first[0] == U(DA_PROMPT)
    assert first[1]["role"] == "assistant" and first[1]["content"].count("<Execute>") == 1
    assert first[1]["content"].endswith("<Answer>Answer: east</Answer>")
    assert [m["role"] for m in ds[2]["messages"]] == ["user", "assistant", "execute", "assistant"]
    assert ds[2]["messages"][2]["content"] == "2"


def test_bespoke_stratos_system_and_sharegpt_roles():
    ds, _ = load("bespoke_stratos.parquet")
    m = ds[0]["messages"]
    assert [x["role"] for x in m] == ["system", "user", "assistant"]
    assert m[0]["content"].startswith("Your role as an assistant involves thoroughly exploring questions")
    assert m[1]["content"] == "Return your final response within \\boxed{}. What is 2+3?"
    assert m[2]["content"].startswith("<|begin_of_thought|>") and m[2]["content"].endswith("<|end_of_solution|>")


def test_numina_uses_its_messages_and_deepscaler_builds_them():
    numina, _ = load("numina_tir.parquet")
    assert numina[0]["messages"] == [U("What is $2^{10}$?"), A(numina[0]["solution"])]
    assert "```output\n1024\n```" in numina[0]["solution"]
    ds, _ = load("deepscaler.parquet")
    assert ds[1]["messages"] == [U("Find $x$ if $2x=8$."), A("$x=8/2=4$.")] and ds[1]["answer"] == "4"


def test_countdown_prompt_is_tinyzero_wording():
    ds, _ = load("countdown.parquet")
    expected = ("Using the numbers [2, 3, 4], create an equation that equals 24. You can use basic arithmetic "
                "operations (+, -, *, /) and each number can only be used once. Show your work in <think> </think> "
                "tags. And return the final answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 "
                "</answer>.")
    assert countdown_prompt([2, 3, 4], 24) == expected
    assert ds[0]["messages"] == [U(expected)] and ds[0]["problem"] == expected
    assert (ds[2]["nums"], ds[2]["target"]) == ([3, 5, 1, 6], 15)


def test_deepanalyze_rl_passthrough():
    ds, _ = load("deepanalyze_rl.parquet")
    assert ds[0]["messages"] == [U(DA_PROMPT)]
    assert ds[0]["reward_spec"] == {"method": "datatask", "ground_truth": "east",
                                    "function": "llm_as_judgement_accuracy"}
    assert (ds[0]["workspace_id"], ds[1]["data_source"]) == ("ws_001", "qa")


def test_arrow_folder_split_and_prompt_completion_conversational():
    test, _ = load("arrow_messages", split="test")
    assert test[0]["messages"] == [U("c?"), A("C")] and test[0]["answer"] == "C"
    with pytest.raises(ValueError, match=r"splits \['train', 'test'\], not 'dev'"):
        load("arrow_messages", split="dev")
    pc, _ = load("prompt_completion.jsonl")
    assert pc[0]["messages"] == [U("1+1="), A("2")]
    conv = prompt_completion_adapter({"prompt": [U("sky?")], "completion": [A("blue")]})
    assert conv["messages"] == [U("sky?"), A("blue")]
    assert prompt_completion_adapter({"prompt": "only"})["messages"] == [U("only")]


@pytest.mark.parametrize(
    "columns, adapter",
    [
        (["system", "conversations"], "bespoke_stratos"),
        (["nums", "target"], "countdown"),
        (["prompt", "reward_spec", "data_source"], "deepanalyze_rl"),
        (["problem", "solution", "messages"], "numina_tir"),
        (["problem", "answer", "solution"], "numina_tir"),
        (["messages"], "messages"),
        (["prompt", "completion"], "prompt_completion"),
        (["prompt"], "prompt_completion"),
    ],
)
def test_detect_adapter_table(columns, adapter):
    assert detect_adapter(columns, "x") == adapter


def test_detect_adapter_unknown_columns_names_the_file():
    with pytest.raises(ValueError, match=r"cannot detect the schema of data/x.jsonl: columns \['foo', 'text'\]"):
        detect_adapter(["text", "foo"], "data/x.jsonl")


def test_bad_rows_error_names_file_row_and_field():
    path = str(FIX / "deepanalyze_bad.jsonl")
    with pytest.raises(BadRowError) as e:
        load("deepanalyze_bad.jsonl", adapter="deepanalyze")
    assert str(e.value).startswith(f"{path}: line 2: field 'messages[1].role': unknown role 'bot'")
    assert "(2 more bad rows)" in str(e.value) and "data.on_bad_row=skip" in str(e.value)


def test_bad_rows_skipped_and_counted():
    path = str(FIX / "deepanalyze_bad.jsonl")
    ds, rep = load("deepanalyze_bad.jsonl", adapter="deepanalyze", _data={"on_bad_row": "skip"})
    assert (rep.rows_read, rep.rows_skipped, rep.rows_kept, rep.rows_used, len(ds)) == (5, 3, 2, 2, 2)
    assert rep.errors == [
        f"{path}: line 2: field 'messages[1].role': unknown role 'bot' (expected one of system, user, assistant, "
        "execute, tool)",
        f"{path}: line 4: field 'messages[1].content': missing or null",
        f"{path}: line 5: field 'messages[1].content': unclosed <Execute>",
    ]
    assert [m[1]["content"] for m in ds["messages"]] == ["<Answer>1</Answer>", "<Answer>2</Answer>"]
    # the generic adapter does not check Execute balance: row 4 is kept
    _, generic = load("deepanalyze_bad.jsonl", _data={"on_bad_row": "skip"})
    assert generic.rows_skipped == 2


def test_malformed_json_line_error_and_skip():
    path = str(FIX / "malformed.jsonl")
    with pytest.raises(BadRowError, match=rf"^{path}: line 3: field '<json>': invalid JSON"):
        load("malformed.jsonl")
    ds, rep = load("malformed.jsonl", _data={"on_bad_row": "skip"})
    assert (rep.rows_read, rep.rows_skipped, len(ds)) == (4, 1, 3)
    assert [m[0]["content"] for m in ds["messages"]] == ["a", "c", "f"]


def test_type_change_between_rows_names_row_and_field(tmp_path):
    p = tmp_path / "mixed.jsonl"
    p.write_text('{"messages": [{"role": "user", "content": "a"}]}\n{"messages": "oops"}\n')
    with pytest.raises(BadRowError, match=r"mixed.jsonl: line 2: field 'messages': expected a list of messages, got"):
        load_source(SourceConfig(path=str(p)), DataConfig())
    q = tmp_path / "nested.jsonl"
    q.write_text('{"messages": [{"role": "user", "content": "a"}]}\n{"messages": [{"role": "user", "content": [1]}]}\n')
    with pytest.raises(BadRowError, match=r"nested.jsonl: line 2: field 'messages\[0\].content': expected a string"):
        load_source(SourceConfig(path=str(q)), DataConfig())


def test_nested_execute_is_a_bad_row(tmp_path):
    p = tmp_path / "nested_exec.jsonl"
    p.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": '
                 '"<Execute>a<Execute>b</Execute></Execute>"}]}\n')
    with pytest.raises(BadRowError, match=r"line 1: field 'messages\[1\].content': nested <Execute> at character 10"):
        load_source(SourceConfig(path=str(p), adapter="deepanalyze"), DataConfig())


@pytest.mark.parametrize(
    "path, kind",
    [("generator:arithmetic", "generator"), ("Jiayi-Pan/Countdown-Tasks-3to4", "hub"),
     (str(FIX / "messages.jsonl"), "json"), (str(FIX / "numina_tir.parquet"), "parquet"),
     (str(FIX / "arrow_messages"), "arrow")],
)
def test_source_kind(path, kind):
    assert source_kind(path) == kind


def test_missing_and_unsupported_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="data/nope.jsonl' does not exist"):
        source_kind("data/nope.jsonl")
    with pytest.raises(FileNotFoundError, match="'a/b/c' does not exist"):
        source_kind("a/b/c")
    (tmp_path / "x.csv").write_text("a\n1\n")
    with pytest.raises(ValueError, match="unsupported file type '.csv'"):
        source_kind(str(tmp_path / "x.csv"))
    with pytest.raises(ValueError, match="unknown generator 'nope'"):
        load_source(SourceConfig(path="generator:nope"), DataConfig())
    with pytest.raises(ValueError, match="unknown adapter 'bogus'"):
        load_source(SourceConfig(path=str(FIX / "messages.jsonl"), adapter="bogus"), DataConfig())


def test_line_reader_names_a_column_whose_type_changes(tmp_path):
    from stagewise.data.sources.readers import read_json_rows

    p = tmp_path / "t.jsonl"
    p.write_text('{"a": [1], "b": 1}\n\n{"a": null}\n{"a": "x"}\n{"a": [2], "b": true}\n')
    with pytest.raises(BadRowError, match=r"t.jsonl: line 4: field 'a': string here but array in earlier rows"):
        read_json_rows(str(p), "error")
    raw = read_json_rows(str(p), "skip")
    assert (raw.row_ids, raw.skipped) == ([0, 1], 2)  # blank lines are not rows (but count as lines)
    assert raw.errors[1].endswith("t.jsonl: line 5: field 'b': boolean here but number in earlier rows")


def _chat(i):
    import json

    return json.dumps({"messages": [U(f"q{i}"), A(f"a{i}")]})


@pytest.mark.parametrize("blank_lines", [False, True], ids=["dense", "with_blank_lines"])
def test_malformed_json_line_is_named_by_its_1_based_line_in_one_short_error(tmp_path, blank_lines):
    """A truncated row on the 8th line of the file is 'line 8' (as an editor shows it; blank lines count), in one
    exception with no chained reader errors."""
    lines = [_chat(i) for i in range(10)]
    if blank_lines:
        lines[2] = lines[5] = ""
    lines[7] = lines[7][:-3]
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(BadRowError) as e:
        load_source(SourceConfig(path=str(p)), DataConfig())
    assert str(e.value) == (f"{p}: line 8: field '<json>': invalid JSON: Expecting ',' delimiter at column 87 "
                            "(set data.on_bad_row=skip to skip bad rows)")
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_adapter_error_in_an_arrow_read_file_is_named_by_its_line(tmp_path):
    """Valid JSON read by the Arrow reader, a bad role on line 6 after two blank lines: 'line 6', not 'row 3'."""
    import json

    bad = json.dumps({"messages": [U("q"), {"role": "bot", "content": "x"}]})
    p = tmp_path / "roles.jsonl"
    p.write_text("\n".join([_chat(0), "", _chat(1), "  ", _chat(2), bad, _chat(3)]) + "\n")
    with pytest.raises(BadRowError) as e:
        load_source(SourceConfig(path=str(p)), DataConfig())
    assert str(e.value).startswith(f"{p}: line 6: field 'messages[1].role': unknown role 'bot'")


def test_rows_of_a_non_line_source_are_1_based(tmp_path):
    import json

    p = tmp_path / "arr.json"
    p.write_text(json.dumps([{"messages": [U("q"), A("a")]}, {"messages": [U("q"), {"role": "bot", "content": "x"}]}],
                            indent=1))
    with pytest.raises(BadRowError, match=r"arr.json: row 2: field 'messages\[1\].role': unknown role 'bot'"):
        load_source(SourceConfig(path=str(p)), DataConfig())
