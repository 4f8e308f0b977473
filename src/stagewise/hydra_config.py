"""Between Hydra and the schemas of `stagewise.config`: compose a config, check it, turn it into objects, and the
checks train.py runs before Hydra does anything (unknown keys, a schema chosen as a stage, ``--cfg job``).

    validate_config(cfg)        unknown keys (naming the key, its schema, the closest field, the stage that owns it)
    typed_config(cfg)           the config as objects: a `TrainConfig` whose ``stage`` is the chosen stage's schema
    compose(overrides)          what ``python train.py <overrides>`` would run, for scripts, benchmarks, notebooks
    ValidateConfig              the Hydra callback that validates before the run folder exists

Hydra's private API (``hydra._internal``) is used in one place, `validate_printed_config`: Hydra prints a
``--cfg job`` config and exits before any callback runs, so the config is composed here the way Hydra is about to.
It was written against hydra-core 1.3 (pyproject.toml pins ``>=1.3.2,<1.4``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

from stagewise.config import (
    ALGORITHM_SCHEMAS,
    STAGE_SCHEMAS,
    AlgorithmBase,
    StageBase,
    TrainConfig,
    register_configs,
)


class UnknownConfigKeyError(KeyError):
    """A key that the schema of its node does not declare (raised by `validate_config`)."""

    def __str__(self) -> str:  # KeyError's own str() wraps the message in quotes
        return str(self.args[0])


# Top-level nodes whose schema depends on their `name`.
_NAMED_SCHEMAS: Dict[str, Dict[str, type]] = {"stage": STAGE_SCHEMAS, "algorithm": ALGORITHM_SCHEMAS}


def _named_schema(group: str, node) -> type:
    """The schema of ``stage`` / ``algorithm``: the one its YAML composed in, or (for a config printed by
    ``--cfg job`` and fed back, which carries no types) the one its ``name`` selects. Raises when they disagree."""
    from omegaconf import OmegaConf

    registry = _NAMED_SCHEMAS[group]
    base = StageBase if group == "stage" else AlgorithmBase
    name = node.get("name", base.name)
    composed = OmegaConf.get_type(node)
    if name == "none" and group == "stage" and composed in (None, dict, StageBase):
        return StageBase  # no stage chosen: a pipeline run
    if name not in registry:
        raise ValueError(f"{group}.name={name!r} is not one of {', '.join(registry)}")
    if composed in registry.values() and composed is not registry[name]:
        raise ValueError(f"{group}.name={name!r} does not match the composed schema {composed.__name__} "
                         f"(which is {group}.name={composed.name!r}): choose the {group} with {group}={name}")
    return registry[name]


def _unknown_key_message(path: str, key: str, schema: type, fields, chosen: Optional[str] = None) -> str:
    """``unknown config key stage.prompts_per_step (not a field of SFTStage, the schema of stage=sft; it is a field
    of stage=grpo; valid keys: [...])``: where the key belongs, else the closest valid name. ``chosen``: the
    ``name`` of a ``stage`` / ``algorithm`` node."""
    import dataclasses
    import difflib

    where = schema.__name__
    group = path[:-1]
    hint = ""
    if group in _NAMED_SCHEMAS:
        registry = _NAMED_SCHEMAS[group]
        where += f", the schema of {group}={chosen}"
        owners = [n for n, s in registry.items() if s is not schema and key in {f.name for f in dataclasses.fields(s)}]
        if owners:
            hint = f"; it is a field of {group}={'|'.join(owners)}"
    if not hint:
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        if close:
            hint = f"; did you mean {path}{close[0]}?"
    if len(fields) <= _LISTED_FIELDS:
        listing = f"; valid keys: {sorted(fields)}"
    elif hint:
        listing = ""
    else:  # no close match among many fields: not the whole list
        listing = f"; no valid key is close, `python train.py --cfg job` shows all {len(fields)}"
    return f"unknown config key {path}{key!s} (not a field of {where}{hint}{listing})"


_LISTED_FIELDS = 8  # a node with at most this many fields lists them all in the unknown-key message


def validate_config(cfg) -> None:
    """Check a composed config against the schemas; raise naming the first unknown key.

    Needed on top of composition because (1) the ``stage`` and ``algorithm`` schemas are composed with their struct
    flag off (see `_unstrict`), (2) Hydra's ``+key=value`` appends with the struct flag lifted, so a misspelt
    ``+stage.learnin_rate`` would slip through, and (3) a config printed by ``--cfg job`` and fed back as the
    primary config carries no schema. ``stage`` and ``algorithm`` are checked against the schema their ``name``
    selects (`STAGE_SCHEMAS`, `ALGORITHM_SCHEMAS`). Types were already checked by OmegaConf on assignment. A
    top-level ``hydra`` node (``compose(..., return_hydra_config=True)``) is Hydra's own and is skipped.
    """
    import dataclasses
    import typing

    from omegaconf import DictConfig, ListConfig, OmegaConf

    def child_schema(schema: type, node, key: str):
        typed = OmegaConf.get_type(node, key)
        if dataclasses.is_dataclass(typed):
            return typed
        declared = typing.get_type_hints(schema).get(key)  # an untyped (printed) config: the declared field type
        return declared if isinstance(declared, type) and dataclasses.is_dataclass(declared) else None

    def walk(node, schema, path: str) -> None:
        if isinstance(node, DictConfig) and path[:-1] in _NAMED_SCHEMAS and path.count(".") == 1:
            schema = _named_schema(path[:-1], node)
        if isinstance(node, DictConfig) and dataclasses.is_dataclass(schema):
            fields = {f.name for f in dataclasses.fields(schema)}
            for key in node.keys():
                if key == "hydra" and not path:
                    continue
                if key not in fields:
                    raise UnknownConfigKeyError(_unknown_key_message(path, str(key), schema, fields, node.get("name")))
                walk(node._get_node(key), child_schema(schema, node, key), f"{path}{key}.")
        elif isinstance(node, ListConfig):
            for i, item in enumerate(node._iter_ex(resolve=False)):
                walk(item, OmegaConf.get_type(item) if isinstance(item, DictConfig) else None, f"{path[:-1]}[{i}].")

    walk(cfg, TrainConfig, "")


def typed_config(cfg) -> TrainConfig:
    """The composed config as objects: a `TrainConfig` whose ``stage`` and ``algorithm`` are the schemas their
    ``name`` selects (`SFTStage`, `PolicyGradientAlgorithm`, ...), every interpolation resolved. train.py hands this
    to the stage's ``run``, so stage code reads typed fields and a typo in a field name is an AttributeError at the
    first read, not a silent ``None``. Accepts a composed DictConfig or a config printed by ``--cfg job`` and fed back
    (no types: they come from the schemas); checks it with `validate_config` first. A `TrainConfig` is returned as is.
    """
    from omegaconf import OmegaConf

    if isinstance(cfg, TrainConfig):
        return cfg
    validate_config(cfg)
    chosen = {group: OmegaConf.structured(_named_schema(group, cfg[group])) for group in _NAMED_SCHEMAS}
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), chosen, cfg))  # type: ignore


def compose(overrides: List[str], config_dir: Optional[str] = None, typed: bool = True):
    """The config ``python train.py <overrides>`` would run, for scripts, benchmarks and notebooks: composed from
    ``config_dir`` (default: the repository's ``conf/``), checked (`validate_config`), as objects (`typed_config`)
    unless ``typed=False``. ``run_id`` resolves to a fresh id unless an override sets it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from stagewise.run_folder import register_resolvers

    register_resolvers()
    register_configs()
    GlobalHydra.instance().clear()
    conf = config_dir or str(Path(__file__).resolve().parents[2] / "conf")
    with initialize_config_dir(config_dir=os.path.abspath(conf), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=list(overrides))
    GlobalHydra.instance().clear()
    if not typed:
        validate_config(cfg)
        return cfg
    return typed_config(cfg)


def config_dict(cfg) -> Dict[str, Any]:
    """A plain, resolved dict of a config given as objects (`typed_config`) or as a DictConfig: what a logger
    (W&B's run config, TensorBoard's hparams) stores."""
    from omegaconf import OmegaConf

    node = cfg if OmegaConf.is_config(cfg) else OmegaConf.structured(cfg)
    return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]


# ------------------------------------------------------------------------------- checks before anything runs
try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover
    _HydraCallback = object


class ConfigValueError(ValueError):
    """A config value that cannot work (a stage without what it needs, a schema chosen as a stage): reported in one
    line like an unknown key."""


def config_error_exit(err: Exception) -> SystemExit:
    """The short exit for a config error: ``Error: <message>`` on stderr, exit code 1, no traceback."""
    return SystemExit(f"Error: {err}")


class ValidateConfig(_HydraCallback):  # type: ignore[misc, valid-type]
    """Hydra callback (``conf/hydra/default.yaml``): `validate_config` before Hydra creates the run folder, so an
    unknown key stops with the project's one-line message and leaves nothing behind. Hydra turns a callback's
    exception into a warning and goes on, hence the ``SystemExit``."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        self._check(config)

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self._check(config)  # the sweep's base config; each job's own overrides are checked by train.py's main

    @staticmethod
    def _check(config: Any) -> None:
        try:
            validate_config(config)
        except (UnknownConfigKeyError, ValueError) as e:
            raise config_error_exit(e) from None


def without_schema_options(help_text: str) -> str:
    """Hydra's ``--help`` lists every entry of a group, the stage and objective schemas (``base_*``, registered for
    the stage files' defaults lists) too; they are not choices."""
    return re.sub(r"\bbase_[a-z_]+, ", "", help_text)


def check_top_level_overrides(argv: List[str], conf_dir: str) -> None:
    """A plain ``key=value`` whose key is neither a top-level field of `TrainConfig` nor a config group (a folder of
    ``conf_dir``, or ``hydra``) stops with the project's one-line message. Hydra would reject it while composing,
    with its own ``Could not override 'foo'. To append to your config use +foo=1``, which suggests the wrong fix and
    never reaches `validate_config` (the composed root is struct). Dotted keys, ``+``/``~`` overrides and flags are
    left to composition and `validate_config`; so is everything when another config folder is given (its groups
    are not known here)."""
    import dataclasses
    import os

    if any(a.startswith(("--config-dir", "--config-path", "-cd", "-cp")) for a in argv):
        return
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    groups = {d for d in os.listdir(conf_dir) if os.path.isdir(os.path.join(conf_dir, d))} | {"hydra"}
    for arg in argv:
        if arg.startswith(("-", "+", "~")) or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        if key in ("stage", "algorithm") and value.startswith("base_"):
            choices = sorted(f[:-5] for f in os.listdir(os.path.join(conf_dir, key))
                             if f.endswith(".yaml") and not f.startswith("base_"))
            raise config_error_exit(ConfigValueError(
                f"{arg} is a schema the {key} files build on, not a {key}: choose one of {', '.join(choices)}"))
        if any(c in key for c in "./@") or key in fields or key in groups:
            continue
        raise config_error_exit(UnknownConfigKeyError(_unknown_key_message("", key, TrainConfig, fields, None)))


def validate_printed_config(argv: List[str], calling_file: str, config_path: str = "conf",
                            config_name: str = "train") -> None:
    """``python train.py ... --cfg job|hydra|all``: Hydra prints the config and exits before any callback or the
    task function runs, so an unknown key would be printed without complaint. Compose the config as Hydra is about
    to (same search path, ``--config-path``/``--config-dir``/``--config-name``, overrides) and validate it; raise the
    short `config_error_exit` on an unknown key. Anything else (not ``--cfg``, a compose error) is left to Hydra,
    which reports it itself."""
    from hydra._internal.utils import create_automatic_config_search_path, get_args_parser

    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit:  # Hydra will print its own usage error
        return
    if not args.cfg:
        return
    from hydra._internal.hydra import Hydra
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    search_path = create_automatic_config_search_path(calling_file, None, args.config_path or config_path)
    if args.config_dir is not None:
        search_path.prepend(provider="command-line", path=f"file://{os.path.abspath(args.config_dir)}",
                            anchor=SearchPathQuery(provider="schema"))
    try:
        hydra = Hydra.create_main_hydra2(task_name=Path(calling_file).stem, config_search_path=search_path)
        cfg = hydra.compose_config(config_name=args.config_name or config_name, overrides=args.overrides,
                                   run_mode=RunMode.RUN, with_log_configuration=False)
    except Exception:  # noqa: BLE001 - Hydra reports compose errors itself when it composes again
        return
    finally:
        GlobalHydra.instance().clear()
    try:
        validate_config(cfg)
    except (UnknownConfigKeyError, ValueError) as e:
        raise config_error_exit(e) from None
