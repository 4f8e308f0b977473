"""The README's generated tables: the fields of every ``stage=`` and ``algorithm=`` schema (`schema_reference`) and
the recipes of ``conf/experiment/`` (`recipe_table`). Tests keep the README equal to them; regenerate with

    python -m stagewise.readme_tables
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import List, Optional

from stagewise.config import ALGORITHM_SCHEMAS, STAGE_SCHEMAS, CheckpointBlock, EarlyStoppingBlock, GenerativeEvalBlock, OptimiserBlock, PeriodicEvalBlock, ScheduleBlock, ScoringBlock

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

# Shared stage blocks in the order the README lists them (`schema_reference`).
_STAGE_BLOCKS = [("optimiser", OptimiserBlock), ("schedule", ScheduleBlock), ("checkpoints", CheckpointBlock),
                 ("scoring", ScoringBlock), ("generative eval", GenerativeEvalBlock),
                 ("periodic eval", PeriodicEvalBlock), ("early stopping", EarlyStoppingBlock)]


def schema_reference() -> str:
    """The README's per-stage and per-objective field tables, generated from the schemas (a test keeps the README
    equal to this; regenerate with ``python -m stagewise.readme_tables``)."""
    def names(cls) -> list:
        return [f.name for f in dataclasses.fields(cls)]

    lines = ["| `stage=` | schema | fields (besides `name`), by shared block |", "|---|---|---|"]
    for stage, schema in STAGE_SCHEMAS.items():
        seen = {"name"}
        parts = []
        for label, block in _STAGE_BLOCKS:
            if issubclass(schema, block):
                own = [n for n in names(block) if n not in seen]
                seen.update(own)
                parts.append(f"{label}: " + ", ".join(f"`{n}`" for n in own))
        own = [n for n in names(schema) if n not in seen]
        if own:
            parts.append(f"{stage}: " + ", ".join(f"`{n}`" for n in own))
        lines.append(f"| `{stage}` | `{schema.__name__}` | " + "; ".join(parts) + " |")
    lines += ["", "| `algorithm=` | schema | fields (besides `name`) |", "|---|---|---|"]
    for schema in dict.fromkeys(ALGORITHM_SCHEMAS.values()):
        choices = ", ".join(f"`{n}`" for n, s in ALGORITHM_SCHEMAS.items() if s is schema)
        fields = ", ".join(f"`{n}`" for n in names(schema) if n != "name") or "none"
        lines.append(f"| {choices} | `{schema.__name__}` | {fields} |")
    return "\n".join(lines)


def recipe_description(path: Path) -> str:
    """What an experiment file is, from its header comment: the text before its first ``:`` or ``(`` (``# DeepSeek-R1
    stage 1, cold-start SFT on long chain-of-thought data (arXiv...`` -> ``DeepSeek-R1 stage 1, cold-start SFT on
    long chain-of-thought data``)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text.startswith("@package"):
            continue
        if not text or text.startswith("python "):
            break
        lines.append(text)
    header = " ".join(lines)
    cut = min((i for i in (header.find(": "), header.find(" (")) if i >= 0), default=len(header))
    return header[:cut].rstrip(" .,")


def recipe_facts(cfg) -> str:
    """The numbers a reader checks against the paper, from the composed config: model, learning rate, lengths,
    samples per prompt, LoRA."""
    st, model = cfg.stage, cfg.model
    facts: List[str] = [f"`{model.name_or_path}`"]
    if getattr(st, "learning_rate", None) is not None and st.name in ("sft", "grpo"):
        facts.append(f"lr {st.learning_rate:g}")
    if st.name == "sft":
        facts.append(f"max length {cfg.data.max_length}" + (", packed" if cfg.data.packing else ""))
    if st.name in ("grpo", "rejection_sampling"):
        facts.append(f"{cfg.rollout.n} samples x {cfg.rollout.max_new_tokens} new tokens")
    if st.name == "grpo":
        facts.append(f"{st.prompts_per_step} prompts/step, `algorithm={cfg.algorithm.name}`")
    if model.lora.enabled:
        facts.append(f"LoRA r{model.lora.r}/α{model.lora.alpha:g}")
    return ", ".join(facts)


def recipe_table(conf_dir: Optional[Path] = None) -> str:
    """One row per ``conf/experiment/<recipe>/<step>.yaml``: the override, what it is, its stage, its numbers."""
    from stagewise.hydra_config import compose

    conf = Path(conf_dir or CONF_DIR)
    lines = ["| `experiment=` | what it is | stage | numbers (composed) |", "|---|---|---|---|"]
    for path in sorted((conf / "experiment").rglob("*.yaml")):
        name = path.relative_to(conf / "experiment").with_suffix("").as_posix()
        cfg = compose([f"experiment={name}"], config_dir=str(conf))
        lines.append(f"| `{name}` | {recipe_description(path)} | {cfg.stage.name} | {recipe_facts(cfg)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(prog="python -m stagewise.readme_tables",
                            description="Print the README's generated tables: the fields of every stage= and "
                                        "algorithm= schema, then the recipes of conf/experiment/.").parse_args()
    print(schema_reference())
    print()
    print(recipe_table())
