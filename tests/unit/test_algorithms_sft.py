"""SFT loss: hand values, and gradient accumulation 4x1 == 1x4 on a real forward of the tiny model."""

import pytest
import torch

from stagewise.algorithms import chunked_token_logprobs, sft_loss
from stagewise.config import ModelConfig
from stagewise.models import load_model_and_tokenizer


def test_hand_values():
    # trained tokens: -1, -2 (seq 0) and -0.5 (seq 1) -> nll sum 3.5 over 3 tokens
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -4.0, float("-inf")]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss, metrics = sft_loss(lp, mask)
    assert loss.item() == pytest.approx(3.5 / 3)
    assert metrics["num_tokens"].item() == 3
    assert metrics["nll_sum"].item() == pytest.approx(3.5)
    assert metrics["nll_mean"].item() == pytest.approx(3.5 / 3)
    # a step-wide normaliser of 7 tokens: this micro-batch contributes 3.5 / 7; d loss / d lp = -1/7 where trained
    loss7, _ = sft_loss(lp, mask, normalizer=7)
    assert loss7.item() == pytest.approx(0.5)
    (grad,) = torch.autograd.grad(loss7, lp)
    torch.testing.assert_close(grad, -torch.tensor([[1, 1, 0], [1, 0, 0]]) / 7.0)
    # a step with no trained token at all: loss 0, not nan
    empty, _ = sft_loss(lp, torch.zeros(2, 3), normalizer=torch.tensor(0))
    assert empty.item() == 0.0
    with pytest.raises(ValueError, match="normalizer must be >= 0"):
        sft_loss(lp, mask, normalizer=-1)


# Four documents of different lengths; the first `prompt` tokens of each are not trained (a user turn).
LENGTHS = [9, 4, 12, 6]
PROMPTS = [3, 1, 5, 2]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer(ModelConfig(), dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(10, len(tok), (n,), generator=g) for n in LENGTHS]
    return model, tok, docs


def _micro_batch(docs, pad_id):
    """Right-padded ids, attention mask, and a loss mask over next-token targets (prompt and padding excluded)."""
    t = max(len(d) for d in docs)
    ids = torch.full((len(docs), t), pad_id)
    attn = torch.zeros(len(docs), t, dtype=torch.long)
    for i, d in enumerate(docs):
        ids[i, : len(d)], attn[i, : len(d)] = d, 1
    pos = torch.arange(t - 1)[None, :]
    lengths = torch.tensor([len(d) for d in docs])[:, None]
    prompts = torch.tensor([PROMPTS[LENGTHS.index(len(d))] for d in docs])[:, None]
    # target at position p is token p + 1; it is trained when p + 1 >= prompt and p + 1 < length
    loss_mask = (pos + 1 >= prompts) & (pos + 1 < lengths)
    return ids, attn, loss_mask


def _loss(model, ids, attn, loss_mask, normalizer):
    hidden = model.model(input_ids=ids, attention_mask=attn).last_hidden_state
    lp, _ = chunked_token_logprobs(hidden[:, :-1], model.lm_head.weight, ids[:, 1:], chunk_size=7)
    return sft_loss(lp, loss_mask, normalizer)[0]


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_loss_matches_transformers_cross_entropy(tiny):
    model, tok, docs = tiny
    ids, attn, loss_mask = _micro_batch(docs, tok.pad_token_id)
    labels = ids.masked_fill(~torch.cat([torch.zeros(4, 1, dtype=torch.bool), loss_mask], 1), -100)
    with torch.no_grad():
        ours = _loss(model, ids, attn, loss_mask, None)
        theirs = model(input_ids=ids, attention_mask=attn, labels=labels).loss
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)


def test_grad_accumulation_4x1_equals_1x4(tiny):
    model, tok, docs = tiny
    ids, attn, loss_mask = _micro_batch(docs, tok.pad_token_id)
    n_tokens = int(loss_mask.sum())
    assert n_tokens == (9 - 3) + (4 - 1) + (12 - 5) + (6 - 2) == 20

    model.zero_grad()
    full = _loss(model, ids, attn, loss_mask, n_tokens)
    full.backward()
    g_full = _grads(model)

    # 4 micro-batches of 1 document, no padding, each divided by the step's 20 tokens
    model.zero_grad()
    total = 0.0
    for d in docs:
        part = _loss(model, *_micro_batch([d], tok.pad_token_id), n_tokens)
        part.backward()
        total += part.item()
    g_accum = _grads(model)
    assert total == pytest.approx(full.item(), abs=1e-5)
    assert g_full.keys() == g_accum.keys() and len(g_full) > 10
    for name in g_full:
        torch.testing.assert_close(g_accum[name], g_full[name], atol=2e-6, rtol=1e-4, msg=name)

    # The 2024 bug: each micro-batch divided by its own token count, then averaged over 4: measurably different.
    model.zero_grad()
    for d in docs:
        (_loss(model, *_micro_batch([d], tok.pad_token_id), None) / 4).backward()
    g_naive = _grads(model)
    diff = max((g_naive[n] - g_full[n]).abs().max().item() for n in g_full)
    scale = max(g_full[n].abs().max().item() for n in g_full)
    assert diff > 0.05 * scale
    model.zero_grad()


def test_lm_head_only_over_trained_tokens(tiny, monkeypatch):
    """sequence_token_logprobs(mask=trained tokens): the LM head projects exactly those rows, and the loss and every
    gradient equal the all-positions path."""
    import stagewise.algorithms.logprobs as logprobs_module
    from stagewise.training.modeling import sequence_token_logprobs

    model, tok, docs = tiny
    ids, attn, loss_mask = _micro_batch(docs, tok.pad_token_id)
    results = []
    for mask in (None, loss_mask):
        model.zero_grad()
        lp, _ = sequence_token_logprobs(model, ids, attention_mask=attn, chunk_size=7, mask=mask)
        loss = sft_loss(lp, loss_mask, int(loss_mask.sum()))[0]
        loss.backward()
        results.append((loss.item(), lp.detach(), _grads(model)))
    (full_loss, full_lp, g_full), (masked_loss, masked_lp, g_masked) = results
    assert masked_loss == pytest.approx(full_loss, abs=1e-6)
    torch.testing.assert_close(masked_lp[loss_mask.bool()], full_lp[loss_mask.bool()], atol=1e-6, rtol=1e-6)
    assert not masked_lp[~loss_mask.bool()].any()  # untrained positions are 0, never computed
    for name in g_full:
        torch.testing.assert_close(g_masked[name], g_full[name], atol=2e-6, rtol=1e-4)

    projected = []
    real = logprobs_module.lm_head_logits
    monkeypatch.setattr(logprobs_module, "lm_head_logits", lambda h, head: projected.append(h.shape[0]) or real(h, head))
    with torch.no_grad():
        sequence_token_logprobs(model, ids, attention_mask=attn, chunk_size=7, mask=loss_mask)
    assert projected == [7, 7, 6]  # the 20 trained tokens in chunks of 7, not the 4 x (T-1) positions


def test_sequence_nll_sum_is_transformers_summed_cross_entropy(tiny):
    """The SFT stage's loss numerator: -sum log p over the trained tokens = transformers' mean CE x trained tokens."""
    from stagewise.training.modeling import sequence_nll_sum

    model, tok, docs = tiny
    ids, attn, loss_mask = _micro_batch(docs, tok.pad_token_id)
    labels = ids.masked_fill(~torch.cat([torch.zeros(4, 1, dtype=torch.bool), loss_mask], 1), -100)
    with torch.no_grad():
        ours = sequence_nll_sum(model, ids, loss_mask.float(), attention_mask=attn, chunk_size=7)
        theirs = model(input_ids=ids, attention_mask=attn, labels=labels).loss * 20
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


@pytest.mark.gpu
def test_liger_fused_cross_entropy_equals_the_chunked_head(tiny):
    """hardware.use_liger on a GPU: Liger's fused linear cross-entropy gives SFT the same summed loss and the same
    gradient for every parameter as our chunked LM head (float32, so the tolerance is about kernels, not dtype)."""
    pytest.importorskip("liger_kernel")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from stagewise.training.modeling import sequence_nll_sum

    model, tok, docs = tiny
    model = model.cuda()
    ids, attn, loss_mask = (t.cuda() for t in _micro_batch(docs, tok.pad_token_id))
    results = []
    for fused in (False, True):
        model.zero_grad()
        nll = sequence_nll_sum(model, ids, loss_mask.float(), attention_mask=attn, chunk_size=7, fused_ce=fused)
        (nll / 20).backward()
        results.append((nll.item(), _grads(model)))
    model.cpu()
    (plain, g_plain), (fused, g_fused) = results
    assert fused == pytest.approx(plain, rel=1e-4) and plain > 0
    assert g_plain.keys() == g_fused.keys() and len(g_plain) > 10
    for name in g_plain:
        torch.testing.assert_close(g_fused[name], g_plain[name], atol=1e-5, rtol=1e-3, msg=name)
    model.zero_grad()
