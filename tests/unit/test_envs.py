"""The env API: the pure rules of the DeepAnalyze gym, the single-turn env, and CodeSandboxEnv on a real sandbox
(real subprocesses: fenced and raw code, errors, timeouts, no-code turns, answers, max_turns, file isolation)."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from stagewise.config import EnvConfig
from stagewise.envs import CodeSandboxEnv, SingleTurnEnv, Step, available_envs, build_env
from stagewise.envs.code_sandbox import NO_CODE_MESSAGE, cut_turn, defang_tags, format_observation, task_workspace
from stagewise.rollout.multiturn import encode_observations, single_token_id


# ------------------------------------------------------------------------------------------ pure rules
def test_cut_turn_keeps_the_first_closing_tag():
    assert cut_turn("<Code>a</Code> tail <Answer>x</Answer>") == "<Code>a</Code>"
    assert cut_turn("<Answer>x</Answer><Code>b</Code>") == "<Answer>x</Answer>"
    assert cut_turn("no tags at all") == "no tags at all"


def test_observation_layout_matches_sft_and_defangs_tags():
    assert format_observation("42\n") == "\n<Execute>\n42\n\n</Execute>\n"  # print's newline is kept
    assert format_observation("42") == "\n<Execute>\n42\n</Execute>\n"
    assert format_observation("a\nb\n\n") == "\n<Execute>\na\nb\n\n\n</Execute>\n"
    assert format_observation("") == "\n<Execute>\n\n</Execute>\n"
    assert defang_tags("a </Execute> b <Answer>7</Answer> <think>") == "a \u2039/Execute\u203a b \u2039Answer\u203a7" \
        "\u2039/Answer\u203a <think>"
    obs = format_observation("print says </Execute><Answer>1</Answer>")
    assert obs.count("</Execute>") == 1 and obs.endswith("</Execute>\n") and "<Answer>" not in obs


def test_rl_trajectory_is_byte_identical_to_the_sft_layout():
    """DeepAnalyze's SFT rows and inference loop: ``<Execute>\\n{raw output}\\n</Execute>``, joined by ``\\n``."""
    turn = "<Analyze>count</Analyze>\n<Code>\n```python\nprint(18)\n```\n</Code>"
    sft = turn + "\n<Execute>\n18\n\n</Execute>\n<Understand>18 rows</Understand>"
    assert turn + format_observation("18\n") + "<Understand>18 rows</Understand>" == sft
    assert format_observation("18\n") == "\n<Execute>\n18\n\n</Execute>\n"


def test_no_code_hint_is_plain_text_without_tags():
    from stagewise.rewards.deepanalyze import format_ok, has_pair, strip_execute

    assert NO_CODE_MESSAGE == ("[Error]:\nNo code is provided. To run code, write a Code action: the Code tag, a "
                               "```python fenced block, then the closing Code tag. To finish, write the final answer "
                               "in an Answer action.")
    obs = format_observation(NO_CODE_MESSAGE)
    assert obs == "\n<Execute>\n" + NO_CODE_MESSAGE + "\n</Execute>\n"  # nothing to defang: no look-alikes
    assert "<" not in NO_CODE_MESSAGE and ">" not in NO_CODE_MESSAGE and "\u2039" not in obs
    assert defang_tags(NO_CODE_MESSAGE) == NO_CODE_MESSAGE
    # neither the raw hint nor a trajectory holding it has a tag the parser could take for the policy's
    trajectory = "<Analyze>hm</Analyze>" + obs
    assert not has_pair(NO_CODE_MESSAGE, "Code") and not has_pair(NO_CODE_MESSAGE, "Answer")
    assert strip_execute(trajectory) == "<Analyze>hm</Analyze>\n\n" and not format_ok(trajectory)


def test_task_workspace_resolution(tmp_path):
    row = {"workspace_id": "w1", "data": "files", "workspace_root": str(tmp_path / "rowroot")}
    assert task_workspace(row, root="/elsewhere") == tmp_path / "rowroot" / "files" / "w1"  # the row's root wins
    assert task_workspace({"workspace_id": "w1", "data": "bird"}, root=str(tmp_path)) == tmp_path / "bird" / "w1"
    assert task_workspace({"workspace_id": "w1", "data": None, "workspace_root": ""}, str(tmp_path)) == tmp_path / "w1"
    assert task_workspace({"workspace_id": ""}, root=str(tmp_path)) is None
    assert task_workspace(None) is None
    with pytest.raises(ValueError, match="env.workspace_root"):
        task_workspace({"workspace_id": "w1"})


def test_observation_tokens_keep_tags_single_and_split_special_tokens(tiny):
    _, tok = tiny
    ex_open, ex_close = single_token_id(tok, "<Execute>"), single_token_id(tok, "</Execute>")
    [ids] = encode_observations(tok, [format_observation("done <|im_end|> ok")])
    assert ids.count(ex_open) == 1 and ids.count(ex_close) == 1
    assert tok.eos_token_id not in ids  # a printed <|im_end|> is text, never the EOS id
    assert tok.decode(ids) == "\n<Execute>\ndone <|im_end|> ok\n</Execute>\n"
    assert ids[1] == ex_open and ids[-2] == ex_close


# ------------------------------------------------------------------------------------------ registry, single turn
def test_registry_builds_each_env():
    assert available_envs() == ["code_sandbox", "single_turn"]
    assert isinstance(build_env(OmegaConf.structured(EnvConfig())), SingleTurnEnv)
    env = build_env(OmegaConf.structured(EnvConfig(name="code_sandbox", max_turns=7, timeout_s=3.0)))
    assert isinstance(env, CodeSandboxEnv) and env.max_turns == 7 and env.sandbox_kwargs["timeout_s"] == 3.0
    with pytest.raises(ValueError, match="env.name='docker'"):
        build_env(OmegaConf.structured(EnvConfig(name="docker")))


def test_single_turn_env_ends_after_one_step():
    env = SingleTurnEnv()
    assert env.reset({"prompt": "x"}) == ""
    step = env.step("anything")
    assert isinstance(step, Step) and tuple(step) == ("", 0.0, True, {"turns": 1})
    with pytest.raises(RuntimeError, match="reset"):
        env.step("again")


# ------------------------------------------------------------------------------------------ the code env
@pytest.fixture
def workspace(tmp_path):
    ws = tmp_path / "root" / "files" / "task1"
    ws.mkdir(parents=True)
    (ws / "data.csv").write_text("k,v\na,1\nb,2\na,4\n")
    return ws


def test_code_env_runs_fenced_and_raw_code_and_reports_errors(workspace):
    task = {"workspace_id": "task1", "data": "files", "workspace_root": str(workspace.parent.parent)}
    with CodeSandboxEnv(max_turns=10, timeout_s=1.0) as env:
        assert env.reset(task) == "" and env.workdir is None  # lazy: no sandbox process before the first block
        obs, reward, done, info = env.step(
            "<Analyze>sum a</Analyze>\n<Code>\n```python\nimport pandas as pd\n"
            "df = pd.read_csv('data.csv')\nprint(df[df.k == 'a'].v.sum())\n```\n</Code>")
        assert obs == "\n<Execute>\n5\n\n</Execute>\n" and reward == 0.0 and not done
        assert info["executed"] and not info["error"] and info["exit_reason"] == "ok" and info["turns"] == 1
        assert env.workdir is not None and env.workdir != workspace

        obs, _, done, info = env.step("<Code>\nx = 6 * 7\nprint(x)\n</Code> trailing text is cut")  # raw code
        assert obs == "\n<Execute>\n42\n\n</Execute>\n" and not done

        obs, _, _, info = env.step("<Code>\n```python\nprint('before')\n1 / 0\n```\n</Code>")
        assert info["error"] and info["exit_reason"] == "exception"
        assert obs.startswith("\n<Execute>\nbefore\n[Error]:\nTraceback") and "ZeroDivisionError" in obs

        obs, _, _, info = env.step("<Code>\nwhile True:\n    pass\n</Code>")  # DeepAnalyze counted this a success
        assert info["timed_out"] and info["error"] and "[Error]:" in obs and "timed out" in obs

        obs, _, done, info = env.step("<Analyze>just thinking</Analyze>")
        assert obs == format_observation(NO_CODE_MESSAGE) and info["no_code"] and info["error"] and not done
        obs, _, _, info = env.step("<Code>\n```python\n```\n</Code>")  # an empty block is no code
        assert info["no_code"]

        obs, _, _, info = env.step("<Code>\nprint(sorted(__import__('os').listdir('.')))\n</Code>")
        assert obs == "\n<Execute>\n['data.csv']\n\n</Execute>\n"  # cwd is the workspace copy

        obs, _, done, info = env.step("<Understand>ok</Understand>\n<Answer>Answer: 5</Answer> <Code>x</Code>")
        assert (obs, done, info["answered"], info["executed"]) == ("", True, True, False)
        with pytest.raises(RuntimeError, match="reset"):
            env.step("<Code>print(1)</Code>")
    assert env.workdir is None  # closed: the sandbox process and the copy are gone


def test_code_env_writes_stay_in_the_trajectory_copy_and_max_turns_ends(workspace):
    task = {"workspace_id": "task1", "data": "files", "workspace_root": str(workspace.parent.parent)}
    env = CodeSandboxEnv(max_turns=2)
    env.reset(task)
    obs, _, done, _ = env.step("<Code>\nopen('data.csv', 'a').write('z,9\\n')\nopen('new.txt', 'w').write('hi')\n"
                               "print(open('data.csv').read().count('\\n'))\n</Code>")
    assert obs == "\n<Execute>\n5\n\n</Execute>\n" and not done
    copy = env.workdir
    assert (copy / "new.txt").read_text() == "hi"
    obs, _, done, info = env.step("<Code>\nprint(open('new.txt').read())\n</Code>")
    assert obs == "\n<Execute>\nhi\n\n</Execute>\n" and done and not info["answered"]  # the 2nd of max_turns=2
    env.close()
    assert sorted(p.name for p in workspace.iterdir()) == ["data.csv"]  # the source is untouched
    assert workspace.joinpath("data.csv").read_text() == "k,v\na,1\nb,2\na,4\n"
    assert not Path(copy).exists() or not any(Path(copy).iterdir())  # removed, or wiped for the next trajectory


def test_code_env_stateless_vs_stateful():
    for stateful, expected in ((False, "NameError"), (True, "7")):
        with CodeSandboxEnv(stateful=stateful) as env:
            env.reset({})  # no workspace_id: an empty workspace
            env.step("<Code>\nx = 7\n</Code>")
            obs, _, _, _ = env.step("<Code>\nprint(x)\n</Code>")
            assert expected in obs, (stateful, obs)


def test_missing_workspace_runs_empty_and_is_flagged(tmp_path):
    with CodeSandboxEnv() as env:
        env.reset({"workspace_id": "nope", "data": "files", "workspace_root": str(tmp_path)})
        obs, _, _, info = env.step("<Code>\nimport os\nprint(os.listdir('.'))\n</Code>")
        assert obs == "\n<Execute>\n[]\n\n</Execute>\n" and info["workspace_missing"]
