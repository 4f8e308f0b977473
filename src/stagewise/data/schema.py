"""The one chat schema every source is converted to, and the pure helpers that act on it.

A row is ``{"messages": [{"role", "content"}, ...], "source": <name>, **passthrough}``. Roles are ``system``,
``user``, ``assistant``, ``execute`` (DeepAnalyze's code-execution output) and ``tool``. Contents are strings.
Passthrough columns (``solution``, ``answer``, ``nums``, ``target``, ``reward_spec`` ...) are carried unchanged so
that rewards can read them.
"""

from __future__ import annotations

from typing import Any, Iterable

from datasets import Features, List, Value

ROLES = ("system", "user", "assistant", "execute", "tool")
EXECUTE_OPEN, EXECUTE_CLOSE = "<Execute>", "</Execute>"
MESSAGES_FEATURE = List({"role": Value("string"), "content": Value("string")})
Message = dict[str, str]


class RowError(ValueError):
    """Raised by an adapter for one bad row; the loader adds the file and the row index."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class BadRowError(ValueError):
    """A row of a data file is unusable. The message names the file, where the row is (``line 8`` of a JSON lines
    file, 1-based as an editor shows it; ``row 8``, 1-based, elsewhere) and the field."""


def need(row: dict[str, Any], key: str, kind: type | tuple[type, ...] = str) -> Any:
    """``row[key]`` checked for presence and type, else a `RowError` naming the field."""
    value = row.get(key)
    if value is None:
        raise RowError(key, "missing or null")
    if not isinstance(value, kind):
        raise RowError(key, f"expected {_kind_name(kind)}, got {type(value).__name__}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__


def check_messages(messages: Any, field: str = "messages", role_key: str = "role", content_key: str = "content",
                   role_map: dict[str, str] | None = None) -> list[Message]:
    """Validate a list of chat messages and return it as plain ``{"role", "content"}`` dicts.

    ``role_map`` renames roles first (ShareGPT's ``human``/``gpt``). A bad entry raises `RowError` with the field
    path, e.g. ``messages[2].role``.
    """
    if messages is None:
        raise RowError(field, "missing or null")
    if not isinstance(messages, (list, tuple)):
        raise RowError(field, f"expected a list of messages, got {type(messages).__name__}")
    if not messages:
        raise RowError(field, "empty conversation")
    out: list[Message] = []
    for i, m in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise RowError(where, f"expected a dict, got {type(m).__name__}")
        role, content = m.get(role_key), m.get(content_key)
        if role_map and isinstance(role, str):
            role = role_map.get(role, role)
        if role not in ROLES:
            raise RowError(f"{where}.{role_key}", f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            got = "missing or null" if content is None else f"expected a string, got {type(content).__name__}"
            raise RowError(f"{where}.{content_key}", got)
        out.append({"role": role, "content": content})
    return out


def merge_execute_messages(messages: Iterable[Message]) -> list[Message]:
    """Fold ``role: execute`` messages into the surrounding assistant turn as inline ``<Execute>`` spans.

    A run of consecutive assistant/execute messages that contains an execute message becomes one assistant
    message; each execute content is rendered ``<Execute>\\n{content}\\n</Execute>\\n``, exactly as DeepAnalyze's
    released chat template renders the execute role (both forms are equivalent:
    https://github.com/ruc-datalab/DeepAnalyze/issues/26). Doing this before templating lets templates that know
    nothing of the execute role (Qwen, DeepSeek) train on such data.
    """
    out: list[Message] = []
    run: list[Message] = []

    def flush() -> None:
        if any(m["role"] == "execute" for m in run):
            text = "".join(
                f"{EXECUTE_OPEN}\n{m['content']}\n{EXECUTE_CLOSE}\n" if m["role"] == "execute" else m["content"]
                for m in run
            )
            out.append({"role": "assistant", "content": text})
        else:
            out.extend(run)
        run.clear()

    for m in messages:
        if m["role"] in ("assistant", "execute"):
            run.append(m)
        else:
            flush()
            out.append(m)
    flush()
    return out


def apply_system_prompt(messages: list[Message], system_prompt: str | None, *, override: bool = True) -> list[Message]:
    """Set the system message.

    ``None`` keeps the conversation's own. A string replaces leading system messages when ``override`` (the
    ``data.system_prompt`` setting), or is only added to conversations without one when not (a caller's default,
    e.g. the R1-Zero prompt for GRPO). An empty string with ``override`` removes the system message.
    """
    if system_prompt is None:
        return list(messages)
    has_own = bool(messages) and messages[0]["role"] == "system"
    if has_own and not override:
        return list(messages)
    rest = [m for i, m in enumerate(messages) if not (m["role"] == "system" and i == 0)]
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + rest


def prompt_part(messages: list[Message]) -> list[Message]:
    """The conversation up to (not including) the first assistant or execute message."""
    for i, m in enumerate(messages):
        if m["role"] in ("assistant", "execute"):
            return list(messages[:i])
    return list(messages)


def aligned_features(feature_sets: Iterable[Features]) -> Features:
    """Union of several datasets' features (first type wins), used to concatenate heterogeneous sources."""
    merged: dict[str, Any] = {}
    for feats in feature_sets:
        for k, v in feats.items():
            merged.setdefault(k, v)
    return Features(merged)
