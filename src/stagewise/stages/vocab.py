"""Stage ``vocab`` (DeepAnalyze stage 0): extend the vocabulary with action tags and save an HF model.

    python train.py stage=vocab model=deepseek_r1_0528_qwen3_8b          # the ten DeepAnalyze tags
    python train.py stage=vocab 'stage.new_tokens=[<Plan>,</Plan>]'      # any list

Features (flag): tags to add (``stage.new_tokens``), initialisation (``stage.init``: ``subtoken_mean`` | ``random``).
See ``stagewise.models.vocab`` for where we depart from DeepAnalyze's script and why. Writes ``final/`` (model,
tokenizer) and ``vocab.json`` (each tag, its id and the sub-tokens its row was initialised from).
"""

from __future__ import annotations

import json
import logging

from stagewise.config import TrainConfig, VocabStage, stage_as
from stagewise.models import load_model_and_tokenizer
from stagewise.models.vocab import extend_vocabulary
from stagewise.run_folder import RunFolder
from stagewise.tracking import Tracker

log = logging.getLogger(__name__)


def run(cfg: TrainConfig) -> dict:
    # setup
    run = RunFolder(cfg.run_dir)
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    rows_before = model.get_input_embeddings().weight.shape[0]
    tokens_before = len(tokenizer)

    # extend
    st = stage_as(cfg, VocabStage)
    added = extend_vocabulary(model, tokenizer, list(st.new_tokens), init=st.init)
    rows_after = model.get_input_embeddings().weight.shape[0]
    for a in added:
        log.info("added %-14s id %-7d initialised from %d sub-tokens %s", a.token, a.id, len(a.subtoken_ids),
                 tokenizer.convert_ids_to_tokens(a.subtoken_ids))
    if not added:
        log.info("all %d tokens are already single tokens: nothing to do", len(cfg.stage.new_tokens))

    # save
    model.save_pretrained(run.final)
    tokenizer.save_pretrained(run.final)
    (run.root / "vocab.json").write_text(json.dumps(
        [{"token": a.token, "id": a.id, "subtoken_ids": a.subtoken_ids} for a in added], indent=2))
    metrics = {"vocab/added": len(added), "vocab/tokens_before": tokens_before, "vocab/tokens_after": len(tokenizer),
               "vocab/rows_before": rows_before, "vocab/rows_after": rows_after}
    with Tracker(cfg, run.root, stage="vocab") as tracker:
        tracker.log(metrics, step=0)
    log.info("saved %s", run.final)
    return metrics
