"""GRPO's samples parquet (``samples/step_<N>.parquet``): every generated completion of a step, kept or filtered,
with its rewards, advantage and multi-turn facts; what the notebook and `stagewise.runs` read."""

from __future__ import annotations

import math
from typing import Any, Dict, List, NamedTuple, Sequence

import torch


class GroupKey(NamedTuple):
    """One generated group of a GRPO step: its generation round, the rank that generated it, its index there."""

    round: int
    rank: int
    group: int


def sample_records(rounds: Sequence, rank: int, n: int, adv_of: Dict[GroupKey, torch.Tensor]
                   ) -> List[Dict[str, Any]]:
    """Rows of ``samples/step_<N>.parquet``. The columns an eval's samples also have keep its names
    (`stagewise.evaluation.results_table`): ``prompt_index``, ``sample``, ``prompt``, ``completion``,
    ``reward_<fn>``, ``reward_total``, ``completion_tokens``, ``truncated``, ``turns`` and the gold columns; GRPO adds
    ``round``, ``advantage``, ``kept``, ``prompt_tokens``, ``completion_chars``, ``finish_reason`` and the
    multi-turn counts. ``rounds``: GRPO's generation rounds on this rank (each a ``batch``, a `RolloutBatch`, the
    dataset ``columns``, the ``total`` and ``per_fn`` rewards); ``adv_of``: a kept group -> its advantages."""
    records = []
    for ri, rd in enumerate(rounds):
        batch, columns = rd.batch, rd.columns
        for j in range(len(batch)):
            g = j // n
            adv = adv_of.get(GroupKey(ri, rank, g))
            rec = {
                "round": ri, "prompt_index": g, "sample": j % n,
                "prompt": columns["prompt"][g] if "prompt" in columns else "",
                "completion": batch.texts[j],
                **{f"reward_{name}": (None if math.isnan(float(v[j])) else float(v[j]))
                   for name, v in rd.per_fn.items()},
                "reward_total": float(rd.total[j]),
                "advantage": float(adv[j % n]) if adv is not None else None,
                "kept": adv is not None,
                "prompt_tokens": len(batch.prompt_ids[j]), "completion_tokens": len(batch.completion_ids[j]),
                "completion_chars": len(batch.texts[j]), "truncated": bool(batch.truncated[j]),
                "turns": 1, "finish_reason": "length" if batch.truncated[j] else "stop",
            }
            # multi-turn facts (turns, code_calls, code_errors, code_timeouts, answered, finish_reason)
            rec.update({k: (v[j].item() if hasattr(v[j], "item") else v[j])
                        for k, v in batch.env_columns.items()})
            for gold in ("answer", "solution", "target"):
                if gold in columns:
                    rec[gold] = str(columns[gold][g])
            records.append(rec)
    return records


def write_samples(acc, path, records: List[Dict[str, Any]], step: int) -> None:
    """``path`` (``samples/step_<N>.parquet``) from every rank's ``records``, written by the main process, atomically."""
    from accelerate.utils import gather_object
    import pandas as pd

    if acc.num_processes > 1:
        records = gather_object(records)
    if not acc.is_main_process:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(records)
    df.insert(0, "step", step)
    tmp = path.with_suffix(".parquet.tmp")
    df.to_parquet(tmp, index=False)
    tmp.replace(path)
