"""Registry: names, parameter checking, and users' own rewards by module or file path."""

import textwrap

import pytest

from stagewise.rewards import CustomRewardError, available, build

ALL = ["accuracy", "answer_tag", "boxed_math", "cosine", "countdown", "deepanalyze", "format", "format_strict",
       "judge", "language_consistency", "length", "reasoning_steps", "repetition_penalty", "reward_model",
       "soft_overlong", "tag_count"]


def test_available_is_sorted_and_complete():
    assert available() == ALL


def test_unknown_name_and_params():
    with pytest.raises(KeyError, match="unknown reward 'acuracy'.*accuracy"):
        build("acuracy")
    with pytest.raises(TypeError, match=r"reward 'cosine' got unknown param\(s\) \['max_length'\]"):
        build("cosine", max_length=10)
    with pytest.raises(TypeError, match=r"reward 'judge' needs param\(s\) \['base_url', 'model'\]"):
        build("judge")


def test_build_records_spec():
    fn = build("cosine", max_len=50)
    assert fn.spec == ("cosine", {"max_len": 50})
    assert fn.max_len == 50


@pytest.fixture
def user_files(tmp_path):
    (tmp_path / "userpkg").mkdir()
    (tmp_path / "userpkg" / "__init__.py").write_text("")
    (tmp_path / "userpkg" / "rewards.py").write_text(textwrap.dedent("""
        def shout(completions, bonus=0.0, **columns):
            return [float(c.isupper()) + bonus for c in completions]
        not_callable = 3
    """))
    (tmp_path / "my_reward.py").write_text(textwrap.dedent("""
        from stagewise.rewards import SampleReward

        def length_reward(completions, scale=1.0, prompt=None, **kwargs):
            assert prompt is not None  # columns arrive as keyword lists
            return [scale * len(c) for c in completions]

        def nan_for_empty(completions, **kwargs):
            return [float("nan") if not c else 1.0 for c in completions]

        def wrong_length(completions, **kwargs):
            return [1.0]

        class MatchesTarget:
            def __init__(self, word):
                self.word = word
            def __call__(self, completions, **kwargs):
                return [float(self.word in c) for c in completions]

        class PerSample(SampleReward):
            def __init__(self, offset=0.0):
                self.offset = offset
            def per_sample(self, completion, row):
                return len(completion) + self.offset + row["extra"]
    """))
    return tmp_path


def test_custom_by_module_path(user_files, monkeypatch):
    monkeypatch.syspath_prepend(str(user_files))
    assert build("userpkg.rewards:shout")(["HI", "hi"]) == [1.0, 0.0]
    assert build("userpkg.rewards:shout", bonus=0.5)(["HI", "hi"], prompt=["a", "b"]) == [1.5, 0.5]


def test_custom_by_file_path(user_files, monkeypatch):
    path = user_files / "my_reward.py"
    assert build(f"{path}:length_reward", scale=0.5)(["ab", "abcd"], prompt=["p", "q"]) == [1.0, 2.0]
    assert build(f"{path}:nan_for_empty")(["", "x"]) == [None, 1.0]
    assert build(f"{path}:MatchesTarget", word="cat")(["a cat", "a dog"]) == [1.0, 0.0]
    assert build(f"{path}:PerSample", offset=1.0)(["ab", "abc"], extra=[10, 20]) == [13.0, 24.0]
    monkeypatch.chdir(user_files)  # relative paths resolve against the current directory
    assert build("my_reward.py:length_reward")(["abc"], prompt=["p"]) == [3.0]
    with pytest.raises(ValueError, match="returned 1 values for 2 completions"):
        build(f"{path}:wrong_length")(["a", "b"])


BAD_PATHS = [
    ("missing/file.py:fn", "file 'missing/file.py' not found"),
    ("no_such_module_xyz.sub:fn", "cannot import module 'no_such_module_xyz.sub'"),
    ("userpkg.rewards:nope", "'userpkg.rewards' has no attribute 'nope'"),
    ("userpkg.rewards:not_callable", "'userpkg.rewards:not_callable' is a int, not a function or class"),
    (":fn", "must look like"),
]


@pytest.mark.parametrize("spec,message", BAD_PATHS)
def test_custom_bad_paths_name_the_path(user_files, monkeypatch, spec, message):
    monkeypatch.syspath_prepend(str(user_files))
    with pytest.raises(CustomRewardError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build(spec)


def test_custom_file_that_fails_to_import(tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("raise RuntimeError('boom at import')\n")
    with pytest.raises(CustomRewardError, match="broken.py.*boom at import"):
        build(f"{bad}:fn")
