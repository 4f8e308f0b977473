"""generator:analysis_tasks: the RL parquet schema, DeepAnalyze's prompt layout, real CSV/XLSX/SQLite files, exact
answers (every worked solution is run in the sandbox and must print the ground truth), deterministic and disjoint
splits, a real parquet round trip through the deepanalyze_rl adapter, and the data=analysis_tiny preset."""

import json
import re
import sqlite3
from pathlib import Path

import pytest

from stagewise.data.generators import GENERATORS
from stagewise.data.generators.analysis_tasks import analysis_tasks, solution_code
from stagewise.envs.code_sandbox import task_workspace
from stagewise.envs.sandbox import Sandbox
from stagewise.rewards import build

from conftest import compose

PROMPT = re.compile(r"# Instruction\n(?P<instruction>.+)\n\n# Data\nFile 1:\n(?P<file>\{.*\})", re.DOTALL)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("tasks")


@pytest.fixture(scope="module")
def rows(root):
    return analysis_tasks(30, split="train", seed=0, workspace_root=str(root))


def test_rows_follow_the_rl_schema_and_prompt_layout(rows, root):
    assert GENERATORS["analysis_tasks"] is analysis_tasks
    assert {r["data_source"] for r in rows} == {"qa", "datatask", "research"}
    for r in rows:
        assert list(r) == ["prompt", "data_source", "input_seq", "workspace_id", "data", "reward_spec", "env_class",
                           "workspace_root", "answer"]
        assert r["env_class"] == "deepanalyze" and r["data"] == "files" and r["workspace_root"] == str(root)
        spec = r["reward_spec"]
        assert spec["method"] == {"qa": "qa", "datatask": "datatask", "research": "openresearch"}[r["data_source"]]
        assert isinstance(spec["function"], list) and spec["ground_truth"]
        [message] = r["prompt"]
        m = PROMPT.fullmatch(message["content"])
        assert message["role"] == "user" and m and m["instruction"] == r["input_seq"]
        info = json.loads(m["file"])
        assert list(info) == ["name", "size"]
        path = task_workspace(r)
        assert path == root / "files" / r["workspace_id"]
        assert sorted(p.name for p in path.iterdir()) == [info["name"]]  # only the task's own file
        assert info["size"] == f"{(path / info['name']).stat().st_size / 1024:.1f}KB"


def test_files_are_real_csv_xlsx_and_sqlite(rows):
    from openpyxl import load_workbook

    seen = set()
    for r in rows:
        ws = task_workspace(r)
        name = json.loads(PROMPT.fullmatch(r["prompt"][0]["content"])["file"])["name"]
        seen.add(name)
        if name == "sales.csv":
            assert (ws / name).read_text().splitlines()[0] == "order_id,region,product,units,price"
        elif name == "trials.csv":
            assert (ws / name).read_text().splitlines()[0] == "treatment,severity,patients,recovered"
        elif name == "employees.xlsx":
            sheet = load_workbook(ws / name)["staff"]
            assert [c.value for c in sheet[1]] == ["name", "department", "salary", "years"]
            assert sheet.max_row >= 9
        else:
            con = sqlite3.connect(ws / name)
            tables = {t for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            con.close()
            assert tables == {"customers", "orders"}
    assert seen == {"sales.csv", "employees.xlsx", "shop.db", "trials.csv"}


def test_worked_solutions_print_the_exact_ground_truth(rows, root):
    """Every qa and datatask solution runs in one real sandbox (a copy of all the task folders) and must print the
    answer the generator computed; the datatask's saved CSV must equal its ground-truth table."""
    checked = 0
    with Sandbox(root / "files", timeout_s=30) as sb:
        for r in rows:
            if r["data_source"] == "research":
                continue
            res = sb.run(f"import os\nos.chdir({r['workspace_id']!r})\n" + solution_code(r))
            assert not res.error, (r["input_seq"], res.output)
            truth = r["reward_spec"]["ground_truth"]
            if r["data_source"] == "qa":
                assert res.output == truth + "\n", (r["input_seq"], res.output, truth)
            else:
                out_file, rest = truth.split(":\n", 1)
                table, top = rest.rsplit("\n", 1)
                assert res.output == top.split(": ", 1)[1] + "\n"
                assert (sb.workdir / r["workspace_id"] / out_file).read_text() == table + "\n"
            checked += 1
    assert checked >= 15


def test_worked_response_scores_one_and_is_well_formed(rows):
    reward = build("deepanalyze")
    qa = [r for r in rows if r["data_source"] == "qa"]
    texts = [r["reward_spec"]["response"] for r in qa]
    assert all(t.count("<Execute>") == t.count("</Execute>") == 1 for t in texts)
    scores = reward(texts, reward_spec=[r["reward_spec"] for r in qa], data_source=[r["data_source"] for r in qa])
    assert scores == [1.0] * len(qa)


def test_deterministic_and_splits_disjoint(rows, root, tmp_path):
    again = analysis_tasks(30, split="train", seed=0, workspace_root=str(root))
    assert again == rows
    other_root = analysis_tasks(30, split="train", seed=0, workspace_root=str(tmp_path))
    assert [r["prompt"] for r in other_root] == [r["prompt"] for r in rows]  # same files, same sizes
    for a, b in zip(rows, other_root):  # byte for byte, xlsx included (openpyxl stamps the save time otherwise)
        for f in task_workspace(a).iterdir():
            assert f.read_bytes() == (task_workspace(b) / f.name).read_bytes(), f.name
    test = analysis_tasks(12, split="test", seed=0, workspace_root=str(root))
    assert not {r["workspace_id"] for r in test} & {r["workspace_id"] for r in rows}
    assert analysis_tasks(30, split="train", seed=1, workspace_root=str(root)) != rows
    only_sql = analysis_tasks(5, workspace_root=str(root), mix={"qa": 1}, file_kinds=["sqlite"])
    assert {r["data_source"] for r in only_sql} == {"qa"} and all("shop.db" in r["input_seq"] for r in only_sql)
    with pytest.raises(ValueError, match="mix"):
        analysis_tasks(1, workspace_root=str(root), mix={"sql": 1})


def test_parquet_round_trip_through_the_rl_adapter(rows, tmp_path, tiny):
    """The rows written as a real parquet file load like DeepAnalyze's RL files: auto-detected adapter, no system
    prompt, reward_spec/workspace columns passed through."""
    import pandas as pd

    from stagewise.config import DataConfig, SourceConfig
    from stagewise.data import load_prompt_dataset

    _, tok = tiny
    path = tmp_path / "qa.parquet"
    pd.DataFrame(rows).to_parquet(path)
    data = load_prompt_dataset(DataConfig(sources=[SourceConfig(path=str(path))], system_prompt="",
                                          max_prompt_length=512), tok)
    ds = data.train
    assert data.report.sources[0].adapter == "deepanalyze_rl" and len(ds) == len(rows)
    by_id = {r["workspace_id"]: r for r in rows}
    assert sorted(ds["workspace_id"]) == sorted(by_id)  # the mixture shuffles; every row is there once
    for got in ds:
        want = by_id[got["workspace_id"]]
        assert got["reward_spec"] == want["reward_spec"] and got["workspace_root"] == want["workspace_root"]
        assert got["data_source"] == want["data_source"] and got["input_seq"] == want["input_seq"]
        assert got["prompt"] == tok.apply_chat_template(want["prompt"], tokenize=False, add_generation_prompt=True)
        assert got["prompt"].startswith("<|im_start|>user\n# Instruction\n")  # no system prompt


def test_analysis_tiny_preset_composes(tmp_path, monkeypatch):
    monkeypatch.setenv("PROJECT_ROOT", str(tmp_path))
    cfg = compose(["stage=grpo", "env=code_sandbox", "data=analysis_tiny", "reward=deepanalyze"])
    [src] = cfg.data.sources
    assert src.path == "generator:analysis_tasks" and src.adapter == "deepanalyze_rl"
    assert Path(src.generator_kwargs.workspace_root) == tmp_path / "outputs" / ".cache" / "analysis_tasks"
    assert cfg.data.system_prompt == "" and cfg.env.name == "code_sandbox" and cfg.env.max_turns == 30
    assert cfg.reward.functions[0].name == "deepanalyze"


def test_trials_show_simpsons_paradox_and_answers_follow_the_file(tmp_path):
    """Every trials.csv task: read back from the written file (pandas, not the generator's numbers), one treatment
    has the higher recovery rate in *both* severities and the other the higher overall rate; the gold answer of
    each question is the one computed from the file, and the direct (shortcut) answer is the other treatment."""
    import pandas as pd

    from stagewise.data.generators.analysis_tasks import direct_response

    rows = analysis_tasks(30, workspace_root=str(tmp_path), mix={"qa": 0.8, "datatask": 0.2}, file_kinds=["trials"])
    trajectories = analysis_tasks(30, workspace_root=str(tmp_path), mix={"qa": 0.8, "datatask": 0.2},
                                  file_kinds=["trials"], form="trajectory", direct_fraction=1.0)
    kinds = set()
    for row, traj in zip(rows, trajectories):
        df = pd.read_csv(task_workspace(row) / "trials.csv")
        assert list(df.columns) == ["treatment", "severity", "patients", "recovered"] and len(df) == 4
        rate = df.set_index(["treatment", "severity"]).eval("recovered / patients")
        within = {sev: rate.xs(sev, level="severity").idxmax() for sev in ("mild", "severe")}
        totals = df.groupby("treatment")[["recovered", "patients"]].sum()
        overall = (totals["recovered"] / totals["patients"]).idxmax()
        assert within["mild"] == within["severe"] != overall  # the paradox
        question = row["input_seq"]
        if "overall recovery rate (" in question:
            expected, kinds = overall, kinds | {"overall"}
        elif question.startswith("Among the"):
            expected, kinds = within["mild"], kinds | {"within"}
        else:
            expected, kinds = overall, kinds | {"datatask"}
        assert row["answer"] == expected, question
        if row["data_source"] == "qa":
            assert traj["messages"][1]["content"].endswith(f"Answer:\n{'AB'.replace(expected, '')}</Answer>")
            assert "<Code>" not in traj["messages"][1]["content"]
    assert kinds == {"overall", "within", "datatask"}


def test_count_across_tables_counts_customers_not_orders(tmp_path):
    """'How many customers have at least one <status> order' is answered from both tables of shop.db (checked here
    with our own query), and at least once differs from the number of such orders (the shortcut)."""
    rows = analysis_tasks(60, workspace_root=str(tmp_path), mix={"qa": 1.0}, file_kinds=["sqlite"])
    asked = [r for r in rows if r["input_seq"].startswith("How many customers in shop.db")]
    assert len(asked) >= 5
    differs = 0
    for r in asked:
        status = re.search(r"status '(\w+)'", r["input_seq"])[1]
        con = sqlite3.connect(task_workspace(r) / "shop.db")
        customers = con.execute("SELECT COUNT(*) FROM customers WHERE id IN "
                                "(SELECT customer_id FROM orders WHERE status = ?)", (status,)).fetchone()[0]
        orders = con.execute("SELECT COUNT(*) FROM orders WHERE status = ?", (status,)).fetchone()[0]
        con.close()
        assert r["answer"] == str(customers)
        differs += customers != orders
    assert differs >= 1


def test_questions_keeps_only_those_kinds_and_names_bad_ones(root):
    """``questions`` (the tiny curriculum's four counting kinds) keeps only qa tasks of those kinds, with the
    question each kind asks and an integer gold answer; an unknown kind, or one no allowed file kind asks, is named."""
    from stagewise.data.generators.analysis_tasks import QA_KINDS, question_kind

    counting = ["orders_over", "units_of", "headcount", "status_count"]
    asks = {"orders_over": r"How many orders in sales\.csv have more than \d+ units\?",
            "units_of": r"How many units of \w+ were sold in total in sales\.csv\?",
            "headcount": r"How many employees in employees\.xlsx work in the \w+ department\?",
            "status_count": r"How many orders in shop\.db have the status '\w+'\?"}
    picked = analysis_tasks(40, split="train", seed=3, workspace_root=str(root), questions=counting)
    kinds = set()
    for r in picked:
        matched = [k for k, pattern in asks.items() if re.match(pattern, r["input_seq"])]
        assert len(matched) == 1 and r["data_source"] == "qa" and r["answer"].isdigit(), r["input_seq"]
        kinds.add(matched[0])
    assert kinds == set(counting)  # 40 rows draw every kind
    assert question_kind("qa|csv|abc|orders_over:12") == "orders_over" and "orders_over" in QA_KINDS["csv"]
    with pytest.raises(ValueError, match=r"questions must be a non-empty subset of .*'avg_price'.* got \['row_sum'\]"):
        analysis_tasks(2, workspace_root=str(root), questions=["row_sum"])
    with pytest.raises(ValueError, match=r"none of questions \['headcount'\] is asked about file_kinds \['csv'\]"):
        analysis_tasks(2, workspace_root=str(root), questions=["headcount"], file_kinds=["csv"])
