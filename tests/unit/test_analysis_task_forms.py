"""analysis_tasks forms: RL rows carry the gold answer, cold-start trajectories carry the sandbox's real output in
the env's observation layout, single-ability rows give the table inline; the DeepAnalyze adapters read all three."""

from stagewise.data.generators import analysis_tasks
from stagewise.data.generators.analysis_tasks import solution_code
from stagewise.data.sources.deepanalyze import check_execute_spans, deepanalyze_adapter, deepanalyze_rl_adapter
from stagewise.envs.code_sandbox import format_observation


def test_rl_rows_carry_the_gold_answer_and_a_real_trajectory(tmp_path):
    rows = analysis_tasks(6, workspace_root=str(tmp_path), mix={"qa": 1.0})
    for row in rows:
        assert row["answer"] == row["reward_spec"]["ground_truth"]
        response = row["reward_spec"]["response"]
        assert f"</Code>\n<Execute>\n{row['answer']}\n\n</Execute>\n<Understand>" in response
        assert response.endswith(f"<Answer>Answer:\n{row['answer']}</Answer>")
        deepanalyze_rl_adapter(row)


def test_first_train_task_exact_strings(tmp_path):
    kinds = ["csv", "xlsx", "sqlite"]  # the draws these strings were checked on (before trials.csv existed)
    row = analysis_tasks(1, workspace_root=str(tmp_path), mix={"qa": 1.0}, file_kinds=kinds)[0]
    traj = analysis_tasks(1, workspace_root=str(tmp_path), mix={"qa": 1.0}, form="trajectory", file_kinds=kinds)[0]
    assert row["answer"] == "55000"
    assert solution_code(row) == ("import pandas as pd\ndf = pd.read_excel('employees.xlsx', sheet_name='staff')\n"
                                  "print(int(df.loc[df['years'] > 25, 'salary'].sum()))")
    assert traj["messages"][1]["content"] == row["reward_spec"]["response"] == (
        "<Analyze>I will load employees.xlsx and compute the answer directly from the data.</Analyze>\n<Code>\n"
        "```python\nimport pandas as pd\ndf = pd.read_excel('employees.xlsx', sheet_name='staff')\n"
        "print(int(df.loc[df['years'] > 25, 'salary'].sum()))\n```\n</Code>\n<Execute>\n55000\n\n</Execute>\n"
        "<Understand>The code printed\n55000\n</Understand>\n<Answer>Answer:\n55000</Answer>")
    assert format_observation("55000\n") == "\n<Execute>\n55000\n\n</Execute>\n"


def test_trajectories_match_the_env_and_direct_ones_skip_code(tmp_path):
    rows = analysis_tasks(40, workspace_root=str(tmp_path), form="trajectory", mix={"qa": 1.0}, direct_fraction=0.5)
    direct = [r for r in rows if "<Code>" not in r["messages"][1]["content"]]
    assert 0 < len(direct) < len(rows)
    for r in rows:
        assert deepanalyze_adapter(r)["messages"] == r["messages"]
        text = r["messages"][1]["content"]
        assert check_execute_spans(text, "messages") == (0 if r in direct else 1)
    assert direct[0]["messages"][1]["content"].startswith(
        "<Analyze>I will answer straight away, without running code.</Analyze>\n<Answer>Answer:\n")
    # the tasks themselves do not depend on direct_fraction
    plain = analysis_tasks(40, workspace_root=str(tmp_path), form="trajectory", mix={"qa": 1.0})
    assert [r["messages"][0] for r in plain] == [r["messages"][0] for r in rows]


def test_single_ability_rows_give_the_table_inline(tmp_path):
    row = analysis_tasks(1, workspace_root=str(tmp_path), form="single", mix={"qa": 1.0},
                         file_kinds=["csv", "xlsx", "sqlite"])[0]
    user, assistant = row["messages"]
    assert user["content"].startswith("# Instruction\nWhat is the total salary of the employees in employees.xlsx "
                                      "with more than 25 years of service?")
    assert "# Data\nemployees.xlsx (sheet staff):\nname,department,salary,years\n" in user["content"]
    assert assistant["content"].endswith("<Answer>Answer:\n55000</Answer>")
    assert "<Code>" not in assistant["content"]
    deepanalyze_adapter(row)
