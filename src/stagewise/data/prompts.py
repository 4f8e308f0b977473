"""Prompt datasets for RL (GRPO, rejection sampling, eval), as in the R1-Zero tutorial's ``make_conversation``
(github.com/FareedKhan-dev/train-deepseek-r1).

Every source goes through the same readers and adapters as SFT data, so any table with ``problem`` (or ``prompt``,
or ``messages``) works; the conversation is cut before its first assistant message. The system prompt is set as
follows: ``data.system_prompt`` (when not null; ``""`` means none) replaces the data's own (its per-dataset default
is in ``conf/data/<name>.yaml``, e.g. the R1-Zero template for countdown); otherwise a caller's ``system_prompt``
argument, if any, is added to conversations that have none (the stages pass none); otherwise the data's own is
kept. Then the chat template is applied with ``add_generation_prompt=True``.

Output columns: ``messages`` (the prompt conversation), ``prompt`` (the rendered text), ``prompt_ids``,
``prompt_length``, ``source``, and every passthrough column (``answer``, ``solution``, ``nums``, ``target``,
``reward_spec`` ...). Prompts longer than ``data.max_prompt_length`` tokens are dropped and counted (SkyRL's
``max_prompt_length`` filter, as DeepAnalyze's RL uses it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from datasets import Dataset, Features, List, Value

from stagewise.config import DataConfig
from stagewise.data.mixture import MixtureReport, load_sources
from stagewise.data.schema import MESSAGES_FEATURE, apply_system_prompt, merge_execute_messages, prompt_part

log = logging.getLogger(__name__)


@dataclass
class PromptStats:
    rows_in: int = 0
    rows_out: int = 0
    too_long_dropped: int = 0
    no_user_dropped: int = 0


@dataclass
class PromptData:
    train: Dataset
    eval: Dataset | None
    report: MixtureReport
    stats: dict[str, PromptStats] = field(default_factory=dict)  # "train" / "eval"


def _prompt_batch(batch: dict[str, list], *, tokenizer, system_prompt: str | None) -> dict[str, list]:
    convs = [apply_system_prompt(prompt_part(merge_execute_messages(m)), system_prompt, override=False)
             for m in batch["messages"]]
    ok = [any(m["role"] == "user" for m in c) for c in convs]
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) if good else ""
             for c, good in zip(convs, ok)]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return {"messages": convs, "prompt": texts, "prompt_ids": ids, "prompt_length": [len(x) for x in ids],
            "_has_user": ok}


def build_prompts(ds: Dataset, tokenizer, data_cfg: DataConfig, system_prompt: str | None = None
                  ) -> tuple[Dataset, PromptStats]:
    """Chat dataset -> prompt dataset (see module docstring)."""
    if data_cfg.system_prompt is not None:  # set explicitly (even ""): already applied by load_sources; wins
        system_prompt = None
    passthrough = [c for c in ds.column_names if c not in ("messages", "prompt", "prompt_ids", "prompt_length")]
    features = Features({**{c: ds.features[c] for c in passthrough}, "messages": MESSAGES_FEATURE,
                         "prompt": Value("string"), "prompt_ids": List(Value("int32")),
                         "prompt_length": Value("int32"), "_has_user": Value("bool")})
    out = ds.map(_prompt_batch, batched=True, features=features,
                 remove_columns=[c for c in ds.column_names if c not in passthrough],
                 fn_kwargs=dict(tokenizer=tokenizer, system_prompt=system_prompt),
                 num_proc=data_cfg.num_proc if data_cfg.num_proc > 1 and len(ds) >= 2 * data_cfg.num_proc else None,
                 desc="building prompts")
    has_user = np.asarray(out["_has_user"], dtype=bool)
    fits = np.asarray(out["prompt_length"], dtype=np.int64) <= data_cfg.max_prompt_length
    keep = np.flatnonzero(has_user & fits)
    stats = PromptStats(rows_in=len(ds), rows_out=len(keep), too_long_dropped=int(np.sum(has_user & ~fits)),
                        no_user_dropped=int(np.sum(~has_user)))
    if stats.too_long_dropped or stats.no_user_dropped:
        log.warning("prompts: dropped %d longer than data.max_prompt_length=%d and %d without a user message",
                    stats.too_long_dropped, data_cfg.max_prompt_length, stats.no_user_dropped)
    return out.select(keep).remove_columns("_has_user"), stats


def load_prompt_dataset(data_cfg: DataConfig, tokenizer, system_prompt: str | None = None,
                        cache_dir: str | None = None) -> PromptData:
    """``data.sources`` (and held-out sources) as prompt datasets; ``system_prompt`` is the caller's default."""
    splits = load_sources(data_cfg, cache_dir=cache_dir)
    train, train_stats = build_prompts(splits.train, tokenizer, data_cfg, system_prompt)
    if not len(train):
        raise ValueError(f"no prompts left: {train_stats} (raise data.max_prompt_length="
                         f"{data_cfg.max_prompt_length} or check that rows have a user message)")
    data = PromptData(train=train, eval=None, report=splits.report, stats={"train": train_stats})
    if splits.eval is not None:
        data.eval, data.stats["eval"] = build_prompts(splits.eval, tokenizer, data_cfg, system_prompt)
    return data
