"""Bespoke-Stratos-17k (bespokelabs/Bespoke-Stratos-17k): ``system`` + ``conversations`` [{from, value}].

ShareGPT roles are renamed (``human``/``user`` -> user, ``gpt``/``assistant`` -> assistant). The row's ``system``
string becomes the first message, unless the conversation already starts with one. The assistant text keeps the
dataset's own ``<|begin_of_thought|>`` ... ``<|end_of_solution|>`` markup unchanged.
"""

from __future__ import annotations

from typing import Any

from stagewise.data.schema import RowError, check_messages

SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "model": "assistant", "observation": "tool"}


def bespoke_stratos_adapter(row: dict[str, Any]) -> dict[str, Any]:
    messages = check_messages(row.get("conversations"), field="conversations", role_key="from",
                              content_key="value", role_map=SHAREGPT_ROLES)
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise RowError("system", f"expected a string, got {type(system).__name__}")
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}] + messages
    return {"messages": messages}
