"""What reaches train.log and the terminal: fatal errors with their traceback, never a secret, no library bars.

``job(main)`` wraps the Hydra task function (``train.py``):
  * secrets are redacted from every log record (a filter on the root logger's handlers, i.e. the console and
    ``train.log``) and from what the trackers get. A secret is the value of an environment variable that the config
    names for a key (``api_key_env: JUDGE_API_KEY``, a ``${oc.env:NAME}`` in a key-like field) or one of the usual
    ones (``WANDB_API_KEY``, ``HF_TOKEN``, ``OPENAI_API_KEY``...); it is written as ``***``;
  * a fatal error is logged with its traceback to the run folder's log file(s) and printed (redacted) on stderr,
    then the process exits 1 (a preemption's ``SystemExit(75)`` and other exits pass through, with a log line);
  * the ``datasets`` library's progress bars are off unless ``$HF_DATASETS_DISABLE_PROGRESS_BARS`` says otherwise
    (they are redrawn with carriage returns, which end up glued to log lines in train.log and SLURM's output).

``RefuseLiteralSecrets`` is a Hydra callback (``conf/hydra/default.yaml``): a config holding a literal secret (a key
such as ``api_key``/``token``/``password`` with a value written in it) is refused before Hydra creates the run
folder or writes ``.hydra/*.yaml``; the error names the key and how to pass the secret instead.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sys
import traceback
from typing import Any, Callable, Iterable, List, Optional, Set

log = logging.getLogger("stagewise")

# key names that hold a secret when given a value (not *_env, which names an environment variable)
SECRET_KEY_RE = re.compile(r"(?i)^(?:.*[_.\-])?(api_?key|secret|secret_?key|password|passwd|access_?token|"
                           r"auth_?token|api_?token|hf_?token|bearer_?token|private_?key|access_?key)$")
# environment variable names that hold a secret (a *_env key naming one of these is a secret's address)
SECRET_ENV_RE = re.compile(r"(?i)(key|token|secret|password|passwd|credential)")
WELL_KNOWN_SECRET_ENV = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY",
                         "ANTHROPIC_API_KEY", "JUDGE_API_KEY")
ENV_INTERP_RE = re.compile(r"\$\{oc\.env:([A-Za-z_][A-Za-z0-9_]*)")
MIN_SECRET_LEN = 6  # shorter values would redact ordinary text
MASK = "***"
REQUEUE_EXIT_CODE = 75  # stagewise.training.preemption.REQUEUE_EXIT_CODE (not imported: that pulls in nothing heavy,
                        # but this module must stay importable before torch)


# --------------------------------------------------------------------------------------------- config walk
def _container(cfg: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(cfg, (DictConfig, ListConfig)):
            return OmegaConf.to_container(cfg, resolve=False)
    except ImportError:  # pragma: no cover
        pass
    return cfg


def _walk(tree: Any, prefix: str = ""):
    """``(dotted key, last key name, value)`` for every leaf."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _walk(v, f"{prefix}{k}.") if isinstance(v, (dict, list)) else [(f"{prefix}{k}", str(k), v)]
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _walk(v, f"{prefix[:-1]}[{i}].") if isinstance(v, (dict, list)) else \
                [(f"{prefix[:-1]}[{i}]", "", v)]


def literal_secrets(cfg: Any) -> List[str]:
    """Dotted keys of the config that hold a secret written as a value (``api_key: sk-...``). A ``${oc.env:..}``
    interpolation is not a literal (Hydra saves it unresolved); empty values and ``null`` are not secrets."""
    tree = _container(cfg)
    if isinstance(tree, dict):
        tree = {k: v for k, v in tree.items() if k != "hydra"}
    found = []
    for dotted, name, value in _walk(tree):
        if not name or not SECRET_KEY_RE.match(name) or value is None or isinstance(value, bool):
            continue
        text = str(value)
        if not text.strip() or "${" in text:
            continue
        found.append(dotted)
    return found


def secret_values(cfg: Any = None, environ: Optional[dict] = None) -> Set[str]:
    """The secrets this process may print: values of the environment variables the config points at, and of the
    well-known secret variables."""
    environ = os.environ if environ is None else environ
    names = set(WELL_KNOWN_SECRET_ENV)
    if cfg is not None:
        for _, name, value in _walk(_container(cfg)):
            if not isinstance(value, str):
                continue
            if name.lower().endswith("_env") and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value) and (
                    SECRET_KEY_RE.match(name[:-4]) or SECRET_ENV_RE.search(value)):
                names.add(value)
            for env_name in ENV_INTERP_RE.findall(value):
                if SECRET_KEY_RE.match(name) or SECRET_ENV_RE.search(env_name):
                    names.add(env_name)
    return {environ[n] for n in names if len(environ.get(n, "") or "") >= MIN_SECRET_LEN}


# --------------------------------------------------------------------------------------------- redaction
class Redactor(logging.Filter):
    """A logging filter that replaces known secrets in the message, its arguments and its traceback."""

    def __init__(self, secrets: Iterable[str] = ()):
        super().__init__()
        self.secrets: List[str] = []
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        merged = set(self.secrets) | {s for s in secrets if s and len(s) >= MIN_SECRET_LEN}
        self.secrets = sorted(merged, key=len, reverse=True)

    def redact(self, text: Any) -> Any:
        if not isinstance(text, str) or not self.secrets:
            return text
        for s in self.secrets:
            if s in text:
                text = text.replace(s, MASK)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: leave it to the handler's own error path
            return True
        clean = self.redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


REDACTOR = Redactor()


def redact(value: Any) -> Any:
    """A string with every known secret masked (other values unchanged); dicts and lists are walked."""
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return REDACTOR.redact(value)


def install_redaction(cfg: Any = None) -> Redactor:
    """Add the config's secrets to the redactor and put it on every handler of the root logger (idempotent)."""
    REDACTOR.add(secret_values(cfg))
    for handler in logging.getLogger().handlers:
        if REDACTOR not in handler.filters:
            handler.addFilter(REDACTOR)
    return REDACTOR


# --------------------------------------------------------------------------------------------- fatal errors
def _file_handlers() -> List[logging.Handler]:
    return [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]


def log_to_files(level: int, message: str, exc_info: Any = None) -> None:
    """One record to the log files only (the terminal gets its own copy on stderr)."""
    record = log.makeRecord(log.name, level, __file__, 0, message, None, exc_info)
    for handler in _file_handlers():
        handler.handle(record)  # handle() applies the handler's filters: redacted
        handler.flush()


def quiet_library_progress_bars() -> None:
    """``datasets`` progress bars off unless the user set ``$HF_DATASETS_DISABLE_PROGRESS_BARS``; transformers' own
    bars off (a "Writing model shards" bar for every checkpoint, glued to the next log line), while downloads from
    the hub keep theirs (unless ``$HF_HUB_DISABLE_PROGRESS_BARS`` says otherwise): a long download is where a bar
    helps."""
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # also switches the hub's bars off ...
    if "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ:
        enable_progress_bars()  # ... so switch those back on
    if "HF_DATASETS_DISABLE_PROGRESS_BARS" in os.environ:
        return
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"  # read when datasets is imported (children too)
    if "datasets" in sys.modules:
        try:
            sys.modules["datasets"].disable_progress_bars()
        except AttributeError:  # pragma: no cover
            pass


@contextlib.contextmanager
def quiet_loggers(*names: str, level: int = logging.WARNING):
    """Raise these loggers to at least ``level`` for the block (libraries that log every file they save at INFO, or
    a failure that the caller reports better itself)."""
    loggers = [logging.getLogger(name) for name in names]
    before = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), level))
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, before):
            lg.setLevel(lvl)


def quiet_other_ranks_console() -> None:
    """Only global rank 0 prints INFO to the terminal (every rank printed every line, twice on 2 processes); the
    other ranks still print warnings and errors, and log everything to their own train.rank<R>.log."""
    from stagewise.run_folder import rank

    if rank() == 0:
        return
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(max(handler.level, logging.WARNING))


def quiet_library_deprecations() -> None:
    """Deprecation notices about calls inside our dependencies, not ours: DeepSpeed's ZeRO-3 gathers call
    ``torch.distributed.all_gather_into_tensor`` (22 warnings a run on 2 processes); vLLM's Triton dispatcher reads
    ``torch.distributed.reduce_op``."""
    import warnings

    for message in (r".*all_gather_into_tensor.* is deprecated", r".*torch\.distributed\.reduce_op.* is deprecated"):
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


def job(fn: Callable) -> Callable:
    """Wrap the Hydra task function: redaction, fatal errors in the log, quiet library bars (module docstring)."""

    @functools.wraps(fn)
    def wrapper(cfg, *args, **kwargs):
        install_redaction(cfg)
        quiet_library_progress_bars()
        quiet_other_ranks_console()
        quiet_library_deprecations()
        try:
            return fn(cfg, *args, **kwargs)
        except SystemExit as e:
            code = e.code
            if code == REQUEUE_EXIT_CODE:
                log_to_files(logging.WARNING, f"exiting with code {REQUEUE_EXIT_CODE} for requeue (preempted)")
            elif isinstance(code, str):
                log_to_files(logging.ERROR, f"fatal: {code}")
            elif code not in (None, 0):
                log_to_files(logging.ERROR, f"exiting with code {code}")
            raise
        except KeyboardInterrupt:
            log_to_files(logging.ERROR, "interrupted (KeyboardInterrupt)", exc_info=sys.exc_info())
            raise
        except Exception as e:
            log_to_files(logging.ERROR, f"fatal error: {type(e).__name__}: {e}", exc_info=sys.exc_info())
            text = "".join(traceback.format_exception(*sys.exc_info()))
            sys.stdout.flush()
            sys.stderr.write(REDACTOR.redact(text))
            sys.stderr.write("\nThe traceback above is also in the run folder's log file"
                             + (f" ({_file_handlers()[0].baseFilename})" if _file_handlers() else "") + ".\n")
            sys.stderr.flush()
            raise SystemExit(1) from None

    return wrapper


# --------------------------------------------------------------------------------------------- hydra callback
try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover
    _HydraCallback = object


class LiteralSecretError(ValueError):
    pass


def check_no_literal_secrets(cfg: Any) -> None:
    found = literal_secrets(cfg)
    if found:
        raise LiteralSecretError(
            f"the config holds a secret written as a value: {', '.join(found)}. Refused before anything is written "
            "(Hydra would save it to .hydra/config.yaml). Put the secret in an environment variable and give its "
            "name instead, e.g. api_key_env: JUDGE_API_KEY (or ${oc.env:JUDGE_API_KEY}).")


class RefuseLiteralSecrets(_HydraCallback):  # type: ignore[misc, valid-type]
    """Hydra callback: refuse a config with a literal secret before the run folder exists. Hydra turns an exception
    raised by a callback into a warning and goes on, so the refusal is a ``SystemExit`` (exit 1, message on
    stderr)."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        self._check(config)

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self._check(config)

    @staticmethod
    def _check(config: Any) -> None:
        try:
            check_no_literal_secrets(config)
        except LiteralSecretError as e:
            raise SystemExit(f"Error: {e}") from None
