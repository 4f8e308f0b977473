"""Generic chat data: a ``messages`` column (OpenAI/ms-swift style), or ``prompt`` + ``completion``.

``prompt`` and ``completion`` may each be a string or a list of messages (TRL's conversational prompt-completion
format). ``completion`` may be absent, which makes a prompt-only row (for GRPO prompt sets).
"""

from __future__ import annotations

from typing import Any

from stagewise.data.schema import RowError, check_messages


def messages_adapter(row: dict[str, Any]) -> dict[str, Any]:
    return {"messages": check_messages(row.get("messages"))}


def _as_messages(value: Any, field: str, role: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, (list, tuple)):
        return check_messages(value, field=field)
    if value is None:
        raise RowError(field, "missing or null")
    raise RowError(field, f"expected a string or a list of messages, got {type(value).__name__}")


def prompt_completion_adapter(row: dict[str, Any]) -> dict[str, Any]:
    messages = _as_messages(row.get("prompt"), "prompt", "user")
    if row.get("completion") is not None:
        messages += _as_messages(row["completion"], "completion", "assistant")
    return {"messages": messages}
