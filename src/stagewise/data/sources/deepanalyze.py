"""DeepAnalyze data (RUC-DataLab/DataScience-Instruct-500K and the RL parquets).

``deepanalyze``: the SFT files (``reasoning/*`` single-ability and ``interation/*`` interaction files) are ms-swift
``messages`` jsonl. In an interaction row one assistant message holds the whole trajectory,
``<Analyze>..</Analyze><Code>..</Code><Execute>..</Execute><Understand>..`` ... ``<Answer>..</Answer>``; execution
results may also come as separate ``role: execute`` messages (https://github.com/ruc-datalab/DeepAnalyze/issues/26),
which tokenise identically. Rows whose ``<Execute>`` tags are unbalanced or nested are bad rows: the loss mask
could not be placed.

``deepanalyze_rl``: ``RL/{qa,datatask,reseach}.parquet``; ``prompt`` is a list of messages (or a string), and
``data_source``, ``input_seq``, ``workspace_id``, ``data``, ``reward_spec``, ``env_class`` pass through for the
environment and the rewards.
"""

from __future__ import annotations

import re
from typing import Any

from stagewise.data.schema import EXECUTE_CLOSE, EXECUTE_OPEN, RowError, check_messages, merge_execute_messages

_TAG = re.compile(re.escape(EXECUTE_OPEN) + "|" + re.escape(EXECUTE_CLOSE))


def check_execute_spans(text: str, field: str) -> int:
    """Number of ``<Execute>``..``</Execute>`` spans in ``text``; `RowError` if unbalanced or nested."""
    depth = spans = 0
    for m in _TAG.finditer(text):
        if m.group() == EXECUTE_OPEN:
            if depth:
                raise RowError(field, f"nested {EXECUTE_OPEN} at character {m.start()}")
            depth = 1
        else:
            if not depth:
                raise RowError(field, f"{EXECUTE_CLOSE} without an opening tag at character {m.start()}")
            depth, spans = 0, spans + 1
    if depth:
        raise RowError(field, f"unclosed {EXECUTE_OPEN}")
    return spans


def deepanalyze_adapter(row: dict[str, Any]) -> dict[str, Any]:
    messages = check_messages(row.get("messages"))
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError("messages", "no assistant message")
    # Validate on the merged form, so that tags inside an execute message's own content are caught too.
    merged = merge_execute_messages(messages)
    for i, m in enumerate(merged):
        if m["role"] == "assistant":
            check_execute_spans(m["content"], f"messages[{i}].content" if merged == messages else "messages")
    return {"messages": messages}


def deepanalyze_rl_adapter(row: dict[str, Any]) -> dict[str, Any]:
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        return {"messages": [{"role": "user", "content": prompt}]}
    return {"messages": check_messages(prompt, field="prompt")}
