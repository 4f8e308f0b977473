"""DeepAnalyze stage 0 on the tiny model: single-token tags, sub-token-mean rows, padded vocab never shrinks."""

from __future__ import annotations

import torch

from stagewise.config import DEEPANALYZE_TAGS, ModelConfig, TinyModelConfig
from stagewise.models import load_model_and_tokenizer
from stagewise.models.vocab import extend_vocabulary


def _bare(pad_multiple: int = 64):
    cfg = ModelConfig(tiny=TinyModelConfig(with_deepanalyze_tags=False, pad_vocab_to_multiple_of=pad_multiple))
    return load_model_and_tokenizer(cfg)


def test_tags_become_single_tokens_with_subtoken_mean_rows():
    model, tok = _bare()
    old_emb = model.get_input_embeddings().weight.detach().clone()
    old_head = model.get_output_embeddings().weight.detach().clone()
    subtokens = {t: tok.encode(t, add_special_tokens=False) for t in DEEPANALYZE_TAGS}
    assert all(len(ids) > 1 for ids in subtokens.values())  # before: several pieces each

    added = extend_vocabulary(model, tok, DEEPANALYZE_TAGS)

    assert [a.token for a in added] == DEEPANALYZE_TAGS
    assert [a.id for a in added] == list(range(1028, 1038))  # appended after the 1028 shipped tokens
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape[0] == old_emb.shape[0] == 1088  # fits in the padded rows: no resize, no shrink
    for tag in DEEPANALYZE_TAGS:
        (tid,) = tok.encode(tag, add_special_tokens=False)
        ids = torch.tensor(subtokens[tag])
        torch.testing.assert_close(emb[tid], old_emb[ids].mean(0), rtol=0, atol=1e-7)
        torch.testing.assert_close(head[tid], old_head[ids].mean(0), rtol=0, atol=1e-7)
    # untouched rows stay identical
    torch.testing.assert_close(emb[:1028], old_emb[:1028], rtol=0, atol=0)
    # a trajectory tokenises each tag to one id
    ids = tok.encode("<Analyze>plan</Analyze><Code>x=1</Code>", add_special_tokens=False)
    assert ids[0] == 1028 and ids[-1] == 1033 and 1029 in ids and 1032 in ids


def test_grows_embedding_and_untied_head_when_rows_run_out():
    model, tok = _bare(pad_multiple=1)  # 1028 rows exactly: the tags need new rows
    assert model.get_input_embeddings().weight.shape[0] == 1028
    old_head = model.get_output_embeddings().weight.detach().clone()
    added = extend_vocabulary(model, tok, ["<Plan>", "</Plan>"])
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape[0] == head.shape[0] == 1088  # grown to the next multiple of 64
    assert emb.data_ptr() != head.data_ptr()  # still untied
    sub = torch.tensor(added[1].subtoken_ids)
    torch.testing.assert_close(head[added[1].id], old_head[sub].mean(0), rtol=0, atol=1e-7)


def test_never_shrinks_a_padded_vocabulary_and_is_idempotent():
    model, tok = load_model_and_tokenizer(ModelConfig())  # already has the tags
    before = model.get_input_embeddings().weight.detach().clone()
    assert extend_vocabulary(model, tok, DEEPANALYZE_TAGS) == []
    assert len(tok) == 1038
    torch.testing.assert_close(model.get_input_embeddings().weight, before, rtol=0, atol=0)
