"""Every config file composes; bad keys and types fail at compose time naming the key; --cfg job round-trips; the
default is the tiny pipeline while choosing a stage (directly or through an experiment) runs one stage."""

from __future__ import annotations

import dataclasses

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from conftest import CONF_DIR, REPO, compose, train_py_in_process
from stagewise.config import ALGORITHM_SCHEMAS, STAGE_SCHEMAS, StageBase, TrainConfig
from stagewise.hydra_config import UnknownConfigKeyError, typed_config, validate_config

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in ("hydra", "local"))


def _options(group: str) -> list[str]:
    return sorted(str(p.relative_to(CONF_DIR / group).with_suffix("")) for p in (CONF_DIR / group).rglob("*.yaml"))


CASES = [(g, o) for g in GROUPS for o in _options(g)]


def test_every_group_has_files():
    for g in ("model", "data", "stage", "algorithm", "hardware", "reward", "env", "rollout", "logger", "paths",
              "pipeline", "experiment"):
        assert g in GROUPS, f"conf/{g}/ is missing"
    assert any(c[0] == "experiment" for c in CASES), "no experiment files"


@pytest.mark.parametrize("group,option", CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_every_config_file_composes(group, option):
    cfg = compose([f"{group}={option}"])
    # the composed config must resolve fully (except values only known inside a Hydra run)
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert isinstance(container["stage"]["name"], str)
    if group in ("model", "stage", "algorithm", "hardware", "rollout"):
        raw = OmegaConf.load(CONF_DIR / group / f"{option}.yaml")
        if OmegaConf.is_config(raw.get(group)):  # a global-package file (every stage file) nests its group
            raw = raw[group]
        def leaves(node, prefix=()):  # (path, value) of every scalar the file sets, nested mappings included
            for key, value in node.items():
                if OmegaConf.is_dict(value):
                    yield from leaves(value, (*prefix, key))
                elif key != "defaults" and not OmegaConf.is_config(value):
                    yield (*prefix, key), value

        checked = 0
        for path, value in leaves(raw):
            composed = OmegaConf.select(cfg[group], ".".join(path))
            assert composed == value, f"{group}/{option}.yaml sets {'.'.join(path)}={value} but composed {composed}"
            checked += 1
        assert checked, f"{group}/{option}.yaml: no value checked"
    typed = typed_config(cfg)  # what train.py hands the stage: objects of the chosen schemas, all resolved
    assert isinstance(typed, TrainConfig)
    assert type(typed.stage) is (STAGE_SCHEMAS[typed.stage.name] if typed.stage.name != "none" else StageBase)
    assert type(typed.algorithm) is ALGORITHM_SCHEMAS[typed.algorithm.name]
    assert typed.stage == OmegaConf.to_object(cfg.stage) and typed.data == OmegaConf.to_object(cfg.data)
    if group == "stage":  # choosing a stage turns the default pipeline off
        assert cfg.pipeline.name is None and cfg.stage.name == option
    if group == "pipeline":
        assert cfg.pipeline.name == (None if option == "none" else option)


def test_launcher_presets_compose():
    for p in sorted((CONF_DIR / "hydra" / "launcher").glob("*.yaml")):
        cfg = compose([f"hydra/launcher={p.stem}"], return_hydra_config=True)
        assert cfg.hydra.launcher._target_.startswith("hydra_plugins"), p


@pytest.mark.parametrize("override,key", [
    ("stage.learning_rte=1e-4", "learning_rte"),
    ("+stage.learning_rte=1e-4", "learning_rte"),
    ("model.lora.rank=8", "rank"),
    ("hardware.per_device_batch=2", "per_device_batch"),
])
def test_misspelt_override_fails_naming_the_key(override, key):
    with pytest.raises(Exception) as err:
        compose([override])
    assert key in str(err.value)


@pytest.mark.parametrize("override,key", [
    ("stage.learning_rate=fast", "learning_rate"),
    ("hardware.num_processes=two", "num_processes"),
    ("rollout.n=1.5", "n"),
])
def test_wrong_type_fails_naming_the_key(override, key):
    with pytest.raises(Exception) as err:
        compose([override])
    assert key in str(err.value)
    assert isinstance(err.value.__cause__ or err.value, (ValidationError, ConfigKeyError, Exception))


def test_unknown_key_in_a_yaml_file_fails(tmp_path):
    bad = tmp_path / "conf"
    import shutil

    shutil.copytree(CONF_DIR, bad)
    (bad / "stage" / "bad.yaml").write_text("name: sft\nlearnin_rate: 1.0\n")
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(bad), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=["stage=bad"])  # schemas compose unstrict: the check
    with pytest.raises(UnknownConfigKeyError) as err:                       # is validate_config's (train.py runs
        validate_config(cfg)                                                # it before the run folder exists)
    assert str(err.value) == ("unknown config key stage.learnin_rate (not a field of SFTStage, the schema of "
                              "stage=sft; did you mean stage.learning_rate?)")


def test_default_is_the_tiny_pipeline_and_a_stage_is_a_single_stage():
    default = compose([], return_hydra_config=True)
    assert default.pipeline.name == "tiny" and default.hydra.runtime.choices.stage is None
    single = compose(["stage=sft", "data=tiny_sft"], return_hydra_config=True)
    assert single.pipeline.name is None and single.stage.name == "sft" and single.data.max_length == 128
    exp = compose(["experiment=deepscaler/qwen3_4b_lora"])
    assert exp.pipeline.name is None and exp.stage.name == "grpo" and exp.stage.prompts_per_step == 64


def test_cfg_job_of_the_default_round_trips(tmp_path, monkeypatch, capsys):
    """The default's printed config is the pipeline (its stages' overrides), and it composes back to itself."""
    proc = train_py_in_process(["--cfg", "job"], tmp_path, monkeypatch, capsys)
    assert proc.returncode == 0, proc.stderr
    printed = OmegaConf.create(proc.stdout)
    assert printed.pipeline.name == "tiny" and "experiment=tiny/sft" in printed.pipeline.stages[0].overrides
    conf = tmp_path / "printed"
    conf.mkdir()
    (conf / "job.yaml").write_text(proc.stdout)
    proc2 = train_py_in_process(["--config-dir", str(conf), "--config-name", "job", "--cfg", "job"], tmp_path,
                                monkeypatch, capsys)
    assert proc2.returncode == 0, proc2.stderr
    assert OmegaConf.create(proc2.stdout) == printed


def test_cfg_job_round_trips(tmp_path, monkeypatch, capsys):
    """`python train.py --cfg job` prints a config that, fed back as the config, composes to the same thing."""
    proc = train_py_in_process(["--cfg", "job", "stage=sft", "stage.learning_rate=3e-5", "rollout.n=5"], tmp_path,
                               monkeypatch, capsys)
    assert proc.returncode == 0, proc.stderr
    printed = OmegaConf.create(proc.stdout)
    assert printed.stage.name == "sft" and printed.stage.learning_rate == 3e-5 and printed.rollout.n == 5
    validate_config(printed)  # the printed (untyped) config passes the same schema check train.py runs
    # feed the printed config back in as the primary config: it must compose to the identical config
    conf = tmp_path / "printed"
    conf.mkdir()
    (conf / "job.yaml").write_text(proc.stdout)
    proc2 = train_py_in_process(["--config-dir", str(conf), "--config-name", "job", "--cfg", "job"], tmp_path,
                                monkeypatch, capsys)
    assert proc2.returncode == 0, proc2.stderr
    assert OmegaConf.create(proc2.stdout) == printed


# ----------------------------------------------------------------------------------- one schema per stage
# (stage, a key of another stage, the stage that has it); each row composes `stage=<stage> stage.<key>=...`
FOREIGN_STAGE_KEYS = [
    ("vocab", "learning_rate=1e-5", "sft|grpo"),
    ("sft", "prompts_per_step=64", "grpo"),
    ("grpo", "new_tokens=[a]", "vocab"),
    ("rejection_sampling", "pass_k=[1,4]", "sft|grpo|eval"),
    ("eval", "best_per_prompt=true", "rejection_sampling"),
]


@pytest.mark.parametrize("stage,override,owners", FOREIGN_STAGE_KEYS, ids=[r[0] for r in FOREIGN_STAGE_KEYS])
@pytest.mark.parametrize("plus", ["", "+"], ids=["set", "append"])
def test_a_key_of_another_stage_fails_naming_key_stage_and_owner(stage, override, owners, plus):
    key = override.split("=")[0]
    with pytest.raises(UnknownConfigKeyError) as err:
        compose([f"stage={stage}", f"{plus}stage.{override}"])
    schema = STAGE_SCHEMAS[stage].__name__
    fields = sorted(f.name for f in dataclasses.fields(STAGE_SCHEMAS[stage]))
    listing = f"; valid keys: {fields}" if len(fields) <= 8 else ""  # only a short list is spelt out
    assert str(err.value) == (f"unknown config key stage.{key} (not a field of {schema}, the schema of "
                              f"stage={stage}; it is a field of stage={owners}{listing})")


def test_stage_files_compose_their_own_schema():
    for name, schema in STAGE_SCHEMAS.items():
        cfg = compose([f"stage={name}"])
        assert OmegaConf.get_type(cfg.stage) is schema, name
    assert OmegaConf.get_type(compose([]).stage).__name__ == "StageBase"  # a pipeline run chooses no stage


def test_a_stage_receives_its_own_schema_as_an_object():
    """train.py hands `run` a `TrainConfig` whose stage is the chosen schema: a field another stage has is not there
    (AttributeError, not a silent value), and a config printed by --cfg job converts to the same objects."""
    cfg = compose(["stage=sft", "data=tiny_sft", "stage.learning_rate=3e-5", "run_id=fixed"])
    typed = typed_config(cfg)
    assert type(typed.stage).__name__ == "SFTStage" and typed.stage.learning_rate == 3e-5
    source = typed.data.sources[0]
    assert type(source).__name__ == "SourceConfig" and source.path == cfg.data.sources[0].path
    with pytest.raises(AttributeError, match="prompts_per_step"):
        typed.stage.prompts_per_step
    printed = OmegaConf.create(OmegaConf.to_yaml(cfg))  # untyped: the schemas come from the names
    assert OmegaConf.get_type(printed.stage) is dict and typed_config(printed) == typed
    assert typed_config(typed) is typed
    from stagewise.hydra_config import compose as compose_for_scripts  # what benchmarks and notebooks call

    assert compose_for_scripts(["stage=sft", "data=tiny_sft", "stage.learning_rate=3e-5", "run_id=fixed"]) == typed
    printed.stage.prompts_per_step = 4
    with pytest.raises(UnknownConfigKeyError, match="stage.prompts_per_step"):
        typed_config(printed)


def test_a_misspelt_stage_key_suggests_the_closest_field():
    with pytest.raises(UnknownConfigKeyError) as err:
        compose(["stage=grpo", "stage.promts_per_step=8"])
    assert str(err.value) == ("unknown config key stage.promts_per_step (not a field of GRPOStage, the schema of "
                              "stage=grpo; did you mean stage.prompts_per_step?)")


def test_policy_gradient_keys_fail_under_algorithm_sft():
    with pytest.raises(UnknownConfigKeyError) as err:
        compose(["algorithm=sft", "algorithm.beta=0.1"])
    assert str(err.value) == ("unknown config key algorithm.beta (not a field of SFTAlgorithm, the schema of "
                              "algorithm=sft; it is a field of algorithm=grpo|dr_grpo|dapo|gspo; valid keys: ['name'])")
    for name in ("grpo", "dr_grpo", "dapo", "gspo"):
        assert OmegaConf.get_type(compose([f"algorithm={name}"]).algorithm) is ALGORITHM_SCHEMAS[name]


def test_stage_name_must_match_the_composed_schema():
    with pytest.raises(ValueError, match=r"stage.name='grpo' does not match the composed schema SFTStage"):
        compose(["stage=sft", "stage.name=grpo"])


def test_train_py_rejects_a_key_of_another_stage(tmp_path, monkeypatch, capsys):
    """`python train.py stage=sft data=tiny_sft stage.prompts_per_step=64` fails before anything runs, naming the
    key and the stage."""
    proc = train_py_in_process(["stage=sft", "data=tiny_sft", "stage.prompts_per_step=64"], tmp_path, monkeypatch,
                               capsys)
    assert proc.returncode == 1
    assert proc.stderr == ("Error: unknown config key stage.prompts_per_step (not a field of SFTStage, the schema of "
                           "stage=sft; it is a field of stage=grpo)\n")


def test_a_printed_config_is_checked_against_the_schema_its_name_selects():
    printed = OmegaConf.create(OmegaConf.to_yaml(compose(["stage=grpo"])))  # untyped, as --cfg job feeds it back
    validate_config(printed)
    printed.stage.new_tokens = ["<a>"]
    with pytest.raises(UnknownConfigKeyError, match=r"stage.new_tokens \(not a field of GRPOStage"):
        validate_config(printed)


def test_a_pipeline_stage_with_a_key_of_another_stage_fails_before_the_pipeline_runs():
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from stagewise.pipeline import stage_kind

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        assert stage_kind(["stage=grpo", "stage.prompts_per_step=4", "pipeline=none"], where="rl") == "grpo"
        with pytest.raises(UnknownConfigKeyError, match=r"unknown config key stage.prompts_per_step \(not a field "
                                                        r"of SFTStage"):
            stage_kind(["stage=sft", "stage.prompts_per_step=4", "pipeline=none"], where="warmup")


def test_readme_lists_each_stage_schema_as_generated():
    from stagewise.readme_tables import schema_reference

    text = (REPO / "README.md").read_text()
    block = text.split("<!-- schema-reference:begin -->\n", 1)[1].split("\n<!-- schema-reference:end -->", 1)[0]
    assert block == schema_reference(), "README's schema table is stale: paste `python -m stagewise.readme_tables` into it"
    assert "`prompts_per_step`" in block.split("| `grpo` |")[1].split("\n")[0]
    assert "`prompts_per_step`" not in block.split("| `sft` |")[1].split("\n")[0]


def test_readme_lists_every_experiment_as_generated():
    from stagewise.readme_tables import recipe_description, recipe_table

    text = (REPO / "README.md").read_text()
    block = text.split("<!-- recipe-table:begin -->\n", 1)[1].split("\n<!-- recipe-table:end -->", 1)[0]
    assert block == recipe_table(), "README's recipe table is stale: paste `python -m stagewise.readme_tables` into it"
    rows = {line.split(" | ")[0].strip("|` ") for line in block.splitlines()[2:]}
    assert rows == {p.relative_to(CONF_DIR / "experiment").with_suffix("").as_posix()
                    for p in (CONF_DIR / "experiment").rglob("*.yaml")}
    deepscaler = next(line for line in block.splitlines() if line.startswith("| `deepscaler/qwen3_4b_lora`"))
    assert "5 samples" in deepscaler and "LoRA r64/α32" in deepscaler and "| grpo |" in deepscaler  # DeepScaleR: 5 rollouts, LoRA r64/α32
    assert recipe_description(CONF_DIR / "experiment" / "r1" / "sft.yaml") == \
        "DeepSeek-R1 stage 1, cold-start SFT on long chain-of-thought data"


def test_help_lists_only_choosable_options(tmp_path, monkeypatch, capsys):
    """The base_* schema entries are registered in the stage and algorithm groups for the stage files' defaults
    lists; ``--help`` does not offer them."""
    out = train_py_in_process(["--help"], tmp_path, monkeypatch, capsys)
    assert out.returncode == 0, out.stderr
    lines = {line.split(":")[0]: line for line in out.stdout.splitlines() if ": " in line}
    assert lines["stage"] == "stage: eval, grpo, rejection_sampling, sft, vocab"
    assert lines["algorithm"] == "algorithm: dapo, dr_grpo, grpo, gspo, sft"
    assert "base_" not in out.stdout


def test_a_schema_chosen_as_a_stage_is_refused_in_one_line_naming_the_choices():
    from conftest import CONF_DIR

    from stagewise.hydra_config import check_top_level_overrides

    with pytest.raises(SystemExit) as err:
        check_top_level_overrides(["stage=base_sft"], str(CONF_DIR))
    assert str(err.value.code) == ("Error: stage=base_sft is a schema the stage files build on, not a stage: choose "
                                   "one of eval, grpo, rejection_sampling, sft, vocab")
    with pytest.raises(SystemExit, match="algorithm=base_policy_gradient is a schema"):
        check_top_level_overrides(["algorithm=base_policy_gradient"], str(CONF_DIR))


def test_stage_as_narrows_to_the_stages_own_schema():
    from stagewise.config import GRPOStage, SFTStage, stage_as

    cfg = typed_config(compose(["stage=sft", "data=tiny_sft"]))
    st = stage_as(cfg, SFTStage)
    assert st is cfg.stage and st.learning_rate == cfg.stage.learning_rate
    with pytest.raises(TypeError, match="stage 'sft' has schema SFTStage, not GRPOStage"):
        stage_as(cfg, GRPOStage)
