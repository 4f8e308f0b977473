"""Math problem sets: NuminaMath-TIR (``problem``, ``solution``, ``messages``), and any ``problem`` table.

NuminaMath-TIR rows carry a ready conversation in ``messages`` (user problem, assistant solution with
```` ```python ```` / ```` ```output ```` blocks); it is used as is. Tables without ``messages`` (DeepScaleR:
``problem``/``answer``/``solution``; the arithmetic generator) become ``user: problem`` followed by
``assistant: solution`` when a solution exists, else a prompt-only row. ``problem``, ``solution`` and ``answer``
stay as passthrough columns for the rewards.
"""

from __future__ import annotations

from typing import Any

from stagewise.data.schema import RowError, check_messages, need


def numina_tir_adapter(row: dict[str, Any]) -> dict[str, Any]:
    if row.get("messages") is not None:
        return {"messages": check_messages(row["messages"])}
    problem = need(row, "problem")
    messages = [{"role": "user", "content": problem}]
    solution = row.get("solution")
    if solution is not None:
        if not isinstance(solution, str):
            raise RowError("solution", f"expected a string, got {type(solution).__name__}")
        messages.append({"role": "assistant", "content": solution})
    return {"messages": messages}
