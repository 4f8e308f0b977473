"""Packing: best-fit-decreasing bins, collator layout, and packed == unpacked loss on the real tiny model."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from stagewise.config import DataConfig, ModelConfig
from stagewise.data import IGNORE_INDEX, PackedDataset, SFTCollator, pack, packing_efficiency, tokenize_sft
from stagewise.data.generators import arithmetic
from stagewise.models import load_model_and_tokenizer


@pytest.mark.parametrize(
    "lengths, max_length, bins",
    [
        # sorted: 8(i0) 5(i2) 4(i1) 1(i3). 8 -> new bin A (room 2); 5 -> new bin B (room 5); 4 -> B (room 1);
        # 1 fits A (room 2) and B (room 1): best fit is B. First-fit-decreasing would put it in A.
        ([8, 4, 5, 1], 10, [[0], [2, 1, 3]]),
        # 7(i2) 5(i0) 4(i4) 3(i1) 2(i3) 1(i5): 7 -> A(1); 5 -> B(3); 4 -> C(4); 3 -> B(0); 2 -> C(2); 1 -> A(0)
        ([5, 3, 7, 2, 4, 1], 8, [[2, 5], [0, 1], [4, 3]]),
        ([4, 4, 4], 4, [[0], [1], [2]]),  # exact fits, ties broken by index
        ([], 8, []),
    ],
)
def test_best_fit_decreasing_bins(lengths, max_length, bins):
    assert pack(lengths, max_length) == bins


def test_packing_efficiency_hand_example():
    lengths = [5, 3, 7, 2, 4, 1]
    assert packing_efficiency(lengths, pack(lengths, 8), 8) == pytest.approx(22 / 24)


def test_pack_rejects_documents_over_max_length():
    with pytest.raises(ValueError, match=r"documents \[1\] are longer than max_length=4"):
        pack([2, 5], 4)


def test_collator_unpacked_layout():
    items = [{"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]}, {"input_ids": [8, 9], "loss_mask": [1, 1]}]
    b = SFTCollator(pad_token_id=0)(items)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2]]
    # a document's first token is never a target (nothing predicts it)
    assert b["loss_mask"].tolist() == [[0, 1, 1], [0, 1, 0]]
    assert b["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX, 9, IGNORE_INDEX]]
    b = SFTCollator(pad_token_id=0, pad_to_multiple_of=4)(items)
    assert b["input_ids"].shape == (2, 4) and b["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]


def test_packed_dataset_and_collator_layout():
    ds = Dataset.from_list([
        {"input_ids": [10, 11, 12], "loss_mask": [0, 1, 1], "length": 3},
        {"input_ids": [20, 21], "loss_mask": [0, 1], "length": 2},
        {"input_ids": [30, 31, 32, 33], "loss_mask": [0, 0, 1, 1], "length": 4},
    ])
    packed = PackedDataset(ds, max_length=6)
    assert packed.bins == [[2, 1], [0]] and len(packed) == 2
    assert packed.efficiency == pytest.approx(9 / 12)
    assert packed[0] == {"input_ids": [30, 31, 32, 33, 20, 21], "loss_mask": [0, 0, 1, 1, 0, 1],
                         "position_ids": [0, 1, 2, 3, 0, 1]}
    b = SFTCollator(pad_token_id=0)([packed[0], packed[1]])
    assert "attention_mask" not in b
    assert b["input_ids"].tolist() == [[30, 31, 32, 33, 20, 21], [10, 11, 12, 0, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]  # padded tail: its own block
    assert b["loss_mask"].tolist() == [[0, 0, 1, 1, 0, 1], [0, 1, 1, 0, 0, 0]]
    flat = SFTCollator(pad_token_id=0, flatten=True)([packed[0], packed[1]])
    assert flat["input_ids"].tolist() == [[30, 31, 32, 33, 20, 21, 10, 11, 12]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 0, 1, 2]]
    assert flat["labels"].tolist() == [[-100, -100, 32, 33, -100, 21, -100, 11, 12]]
    assert flat["cu_seq_lens"].tolist() == [0, 4, 6, 9] and flat["cu_seq_lens"].dtype == torch.int32
    assert "cu_seq_lens" not in b  # padded rows: the mask comes from the positions


def _summed_nll(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of per-token NLL over trained targets, and the per-token values in row-major order."""
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                attention_mask=batch.get("attention_mask"), use_cache=False)
    logp = torch.log_softmax(out.logits[:, :-1].double(), -1)
    target = batch["input_ids"][:, 1:]
    mask = batch["loss_mask"][:, 1:].bool()
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return nll[mask].sum(), nll[mask]


@pytest.fixture(scope="module")
def tiny_data():
    model, tok = load_model_and_tokenizer(ModelConfig(attn_implementation="sdpa"))
    model.eval()
    rows = arithmetic(7, seed=5)
    rows[2]["messages"][1]["content"] += " and some longer text to vary the lengths"
    rows[5]["messages"] += [{"role": "user", "content": "Again?"}, {"role": "assistant", "content": "Yes."}]
    ds = Dataset.from_list([{"messages": r["messages"], "source": "a"} for r in rows])
    tokenized, _ = tokenize_sft(ds, tok, DataConfig(max_length=160), use_cache=False)
    return model, tok, tokenized


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_and_unpacked_batches_give_the_same_loss(tiny_data, attn):
    model, tok, tokenized = tiny_data
    model.config._attn_implementation = attn
    collate = SFTCollator(pad_token_id=tok.pad_token_id)
    unpacked = collate([tokenized[i] for i in range(len(tokenized))])
    packed_ds = PackedDataset(tokenized, max_length=160)
    assert len(packed_ds) < len(tokenized) and max(len(b) for b in packed_ds.bins) >= 2
    packed = collate([packed_ds[i] for i in range(len(packed_ds))])
    flat = SFTCollator(pad_token_id=tok.pad_token_id, flatten=True)([tokenized[i] for i in range(len(tokenized))])
    with torch.no_grad():
        loss_u, tok_u = _summed_nll(model, unpacked)
        loss_p, tok_p = _summed_nll(model, packed)
        loss_f, _ = _summed_nll(model, flat)
    n_trained = int(unpacked["loss_mask"][:, 1:].sum())
    assert n_trained == int(packed["loss_mask"][:, 1:].sum()) == len(tok_u) == len(tok_p) > 100
    assert abs(loss_u - loss_p).item() < 1e-5 and abs(loss_u - loss_f).item() < 1e-5
    assert torch.allclose(tok_u.sort().values, tok_p.sort().values, atol=1e-6)
    model.config._attn_implementation = "sdpa"


def test_attention_does_not_cross_documents(tiny_data):
    """Changing document A's tokens must leave document B's logits in the same packed row unchanged."""
    model, tok, tokenized = tiny_data
    a, b = tokenized[0], tokenized[1]
    row = {"input_ids": a["input_ids"] + b["input_ids"], "loss_mask": a["loss_mask"] + b["loss_mask"],
           "position_ids": list(range(a["length"])) + list(range(b["length"]))}
    altered = dict(row, input_ids=[(t + 7) % 900 + 3 for t in a["input_ids"]] + b["input_ids"])
    collate = SFTCollator(pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        l1 = model(**{k: v for k, v in collate([row]).items() if k in ("input_ids", "position_ids")},
                   use_cache=False).logits
        l2 = model(**{k: v for k, v in collate([altered]).items() if k in ("input_ids", "position_ids")},
                   use_cache=False).logits
    n = a["length"]
    assert (l1[0, :n] - l2[0, :n]).abs().max() > 1e-2  # A's own logits do change
    assert (l1[0, n:] - l2[0, n:]).abs().max() < 1e-5  # B's do not


def test_collator_for_model_flattens_for_flash_attention_and_sdpa_varlen(tiny_data):
    model, tok, _ = tiny_data
    assert SFTCollator.for_model(model, tok.pad_token_id).flatten is False  # plain sdpa: padded rows, a mask
    try:
        for attn in ("flash_attention_2", "sdpa_varlen"):
            model.config._attn_implementation = attn
            assert SFTCollator.for_model(model, tok.pad_token_id).flatten is True
    finally:
        model.config._attn_implementation = "sdpa"


def test_flattened_sdpa_varlen_batch_gives_the_padded_loss_and_gradients(tiny_data):
    """Padded-mode SFT under ``sdpa_varlen``: the micro-batch's rows as one unpadded row with ``cu_seq_lens``. The
    per-token log-probs and the gradients equal those of the same rows padded with an attention mask."""
    from stagewise.training.modeling import sequence_token_logprobs

    model, tok, tokenized = tiny_data
    items = [tokenized[i] for i in range(len(tokenized))]
    padded = SFTCollator(pad_token_id=tok.pad_token_id)(items)
    flat = SFTCollator(pad_token_id=tok.pad_token_id, flatten=True)(items)
    assert flat["input_ids"].shape[1] == sum(len(it["input_ids"]) for it in items) < padded["input_ids"].numel()
    results = []
    model.config._attn_implementation = "sdpa_varlen"
    try:
        for batch in (padded, flat):
            model.zero_grad()
            mask = batch["loss_mask"][:, 1:].bool()
            lp, _ = sequence_token_logprobs(model, batch["input_ids"], position_ids=batch["position_ids"],
                                            attention_mask=batch.get("attention_mask"),
                                            cu_seq_lens=batch.get("cu_seq_lens"), chunk_size=64, mask=mask)
            (-(lp * mask).sum()).backward()
            results.append((lp[mask].detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                if p.grad is not None}))
    finally:
        model.config._attn_implementation = "sdpa"
        model.zero_grad()
    (lp_p, g_p), (lp_f, g_f) = results
    assert len(lp_p) == len(lp_f) > 100
    assert torch.allclose(lp_p, lp_f, atol=1e-5)  # row-major order is the same in both layouts
    assert g_p.keys() == g_f.keys() and len(g_p) > 10
    for name in g_p:
        scale = float(g_p[name].abs().max())
        assert torch.allclose(g_f[name], g_p[name], atol=1e-5 * max(1.0, scale), rtol=1e-4), name


def test_packing_tokenised_arithmetic_rows_hand_count(tiny_data):
    """Rows of 45-49 tokens in 256-token bins: five always fit (5 x 49 = 245), six never do (6 x 45 = 270)."""
    _, tok, _ = tiny_data
    ds = Dataset.from_list([{"messages": r["messages"], "source": "a"} for r in arithmetic(24)])
    rows, _ = tokenize_sft(ds, tok, DataConfig(max_length=256), use_cache=False)
    assert 45 <= min(rows["length"]) and max(rows["length"]) <= 49
    packed = PackedDataset(rows, max_length=256)
    assert sorted(map(len, packed.bins)) == [4, 5, 5, 5, 5]
    assert packed.efficiency == sum(rows["length"]) / (5 * 256)
    batch = SFTCollator(tok.pad_token_id)([packed[i] for i in range(len(packed))])
    # every document's own targets survive packing: trained targets = sum over rows of loss_mask[1:]
    assert int(batch["loss_mask"].sum()) == sum(sum(m[1:]) for m in rows["loss_mask"])
