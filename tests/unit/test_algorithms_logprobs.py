"""Chunked log-probs/entropy equal the full-vocab reference (values and gradients) and stay chunked."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from stagewise.algorithms import (
    chunked_token_logprobs,
    entropy_from_logits,
    entropy_metrics,
    token_logprobs_from_logits,
)

B, T, H, V = 2, 7, 16, 37


def _case(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    targets = torch.randint(0, V, (B, T), generator=g)
    return hidden, weight, targets


def _reference(hidden, weight, targets, temperature):
    logp = torch.log_softmax(hidden @ weight.T / temperature, dim=-1)
    return logp.gather(-1, targets[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("chunk_size", [1, 3, 5, 14, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_equals_full_vocab_values_and_gradients(chunk_size, temperature):
    hidden, weight, targets = _case()
    g = torch.Generator().manual_seed(1)
    c_lp, c_ent = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)  # arbitrary upstream gradients

    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref_lp, ref_ent = _reference(h_ref, w_ref, targets, temperature)
    ((ref_lp * c_lp).sum() + (ref_ent * c_ent).sum()).backward()

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, ent = chunked_token_logprobs(h, w, targets, chunk_size, temperature=temperature, with_entropy=True)
    ((lp * c_lp).sum() + (ent * c_ent).sum()).backward()

    assert lp.shape == ent.shape == (B, T) and lp.dtype == torch.float32
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.grad, h_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad, w_ref.grad, atol=1e-5, rtol=1e-5)


def test_head_module_gives_the_same_values_and_gradients_as_its_weight():
    """The ZeRO-3 path passes the lm_head module (its hooks gather the partitioned weight) instead of the weight."""
    hidden, weight, targets = _case(3)
    head = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(weight)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp1, _ = chunked_token_logprobs(h1, w1, targets, 4)
    lp1.sum().backward()
    h2 = hidden.clone().requires_grad_()
    lp2, _ = chunked_token_logprobs(h2, head, targets, 4)
    lp2.sum().backward()
    torch.testing.assert_close(lp2, lp1)
    torch.testing.assert_close(h2.grad, h1.grad)
    torch.testing.assert_close(head.weight.grad, w1.grad)
    with pytest.raises(ValueError, match="H=16"):
        chunked_token_logprobs(hidden, torch.nn.Linear(8, V, bias=False), targets, 4)


@pytest.mark.parametrize("chunk_size", [3, 1000])
def test_entropy_without_grad_is_a_metric_only(chunk_size):
    """entropy_grad=False (GRPO at entropy_coef=0): the entropy values are unchanged but carry no graph, so its
    [N, V] softmax is not kept for backward; the log-prob gradients are those of the path with grad."""
    hidden, weight, targets = _case(5)
    ref_lp, ref_ent = _reference(hidden, weight, targets, 0.7)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp1, ent1 = chunked_token_logprobs(h1, w1, targets, chunk_size, temperature=0.7, with_entropy=True)
    lp1.sum().backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp2, ent2 = chunked_token_logprobs(h2, w2, targets, chunk_size, temperature=0.7, with_entropy=True,
                                       entropy_grad=False)
    assert ent1.requires_grad and lp2.requires_grad and not ent2.requires_grad
    torch.testing.assert_close(ent2, ref_ent, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent2, ent1.detach())
    lp2.sum().backward()
    torch.testing.assert_close(h2.grad, h1.grad)
    torch.testing.assert_close(w2.grad, w1.grad)
    lp3, ent3 = token_logprobs_from_logits((hidden @ weight.T).requires_grad_(), targets, 0.7, with_entropy=True,
                                           entropy_grad=False)
    assert lp3.requires_grad and not ent3.requires_grad
    torch.testing.assert_close(ent3, ref_ent, atol=1e-5, rtol=1e-5)


def test_without_entropy_and_without_grad():
    hidden, weight, targets = _case(3)
    with torch.no_grad():
        lp, ent = chunked_token_logprobs(hidden, weight, targets, 4)
    assert ent is None and not lp.requires_grad
    torch.testing.assert_close(lp, _reference(hidden, weight, targets, 1.0)[0], atol=1e-5, rtol=1e-5)


def test_mask_computes_only_selected_tokens():
    hidden, weight, targets = _case(4)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 2:5] = True
    mask[1, 6] = True
    h = hidden.clone().requires_grad_()
    lp, _ = chunked_token_logprobs(h, weight, targets, 2, mask=mask)
    lp.sum().backward()
    h_ref = hidden.clone().requires_grad_()
    ref, _ = _reference(h_ref, weight, targets, 1.0)
    (ref * mask).sum().backward()
    torch.testing.assert_close(lp, ref * mask, atol=1e-5, rtol=1e-5)
    assert torch.equal(lp[~mask], torch.zeros(int((~mask).sum())))
    torch.testing.assert_close(h.grad, h_ref.grad, atol=1e-5, rtol=1e-5)
    assert torch.equal(h.grad[~mask], torch.zeros(int((~mask).sum()), H))


def test_negative_targets_give_zero():
    hidden, weight, targets = _case(5)
    targets[0, :3] = -100
    lp, _ = chunked_token_logprobs(hidden, weight, targets, 4)
    assert lp[0, :3].tolist() == [0.0, 0.0, 0.0]
    torch.testing.assert_close(lp[1], _reference(hidden, weight, targets.clamp(min=0), 1.0)[0][1], atol=1e-5,
                               rtol=1e-5)


class _WideTensorLog(TorchDispatchMode):
    """Records the row count of every freshly allocated (non-view) tensor ``[rows, V]``, except weight-shaped
    ``[H, V]`` ones (the transposed LM head and its gradient, which are not logits)."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if (isinstance(o, torch.Tensor) and o.dim() >= 2 and o.shape[-1] == V and not o._is_view()
                    and tuple(o.shape) != (H, V)):
                self.rows.append(o.numel() // V)
        return out


def test_never_more_than_chunk_size_rows_of_logits_forward_and_backward():
    hidden, weight, targets = _case(6)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    saved_vocab_wide = []

    def pack(x):
        if x.dim() >= 2 and x.shape[-1] == V and x.data_ptr() != w.data_ptr():
            saved_vocab_wide.append(tuple(x.shape))
        return x

    with _WideTensorLog() as log:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            lp, ent = chunked_token_logprobs(h, w, targets, 3, with_entropy=True)
        (lp.sum() + ent.sum()).backward()
    assert log.rows, "the dispatch log saw no logits at all"
    assert max(log.rows) <= 3  # 14 tokens, but never more than 3 rows of [., V] at once
    # checkpointing: no [chunk, V] activation is kept alive between forward and backward
    assert saved_vocab_wide == []


def test_token_logprobs_from_logits():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(B, T, V, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (B, T), generator=g)
    lp, ent = token_logprobs_from_logits(logits, targets, temperature=0.5, with_entropy=True)
    logp = torch.log_softmax(logits.detach() / 0.5, -1)
    torch.testing.assert_close(lp, logp.gather(-1, targets[..., None]).squeeze(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, -(logp.exp() * logp).sum(-1), atol=1e-5, rtol=1e-5)
    lp.sum().backward()
    # d log_softmax(z/τ)_y / dz = (onehot_y - softmax(z/τ)) / τ
    expected = (F.one_hot(targets, V).float() - logp.exp()) / 0.5
    torch.testing.assert_close(logits.grad, expected, atol=1e-5, rtol=1e-5)


def test_bf16_logits_are_upcast():
    logits = torch.tensor([[[2.0, 0.0, -1.0]]], dtype=torch.bfloat16)
    lp, _ = token_logprobs_from_logits(logits, torch.tensor([[0]]))
    # log softmax([2, 0, -1])[0] = 2 - log(e^2 + 1 + e^-1) = -0.1698
    assert lp.dtype == torch.float32
    assert lp.item() == pytest.approx(2 - math.log(math.exp(2) + 1 + math.exp(-1)), abs=1e-6)


def test_entropy_helpers():
    # uniform over 4 -> ln 4; one-hot-ish (100, 0, 0, 0) -> ~0
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0, 0.0], [0.0] * 4]])
    ent = entropy_from_logits(logits)
    torch.testing.assert_close(ent, torch.tensor([[math.log(4), 0.0], [math.log(4), math.log(4)]]), atol=1e-6,
                               rtol=1e-6)
    # temperature 2 on (ln 3, 0): softmax(ln 3 / 2, 0) = (√3, 1) / (√3 + 1)
    p = torch.tensor([math.sqrt(3), 1.0]) / (math.sqrt(3) + 1)
    assert entropy_from_logits(torch.tensor([math.log(3), 0.0]), 2.0).item() == pytest.approx(
        float(-(p * p.log()).sum()), abs=1e-6)

    # metrics over trained tokens: entropies [[1, 2, 9], [4, 9, 9]], mask [[1, 1, 0], [1, 0, 0]]
    e = torch.tensor([[1.0, 2.0, 9.0], [4.0, 9.0, 9.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    metrics = entropy_metrics(e, m)
    assert metrics["entropy/mean"].item() == pytest.approx(7 / 3)
    assert metrics["entropy/min"].item() == 1.0
    assert metrics["entropy/max"].item() == 4.0
    assert metrics["entropy/seq_mean_min"].item() == pytest.approx(1.5)  # seq means 1.5 and 4


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(chunk_size=0), "hardware.logprob_chunk_size=0 must be >= 1"), (dict(temperature=0.0), "must be > 0")],
)
def test_bad_arguments(kwargs, message):
    hidden, weight, targets = _case()
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        chunked_token_logprobs(hidden, weight, targets, **{"chunk_size": 4, **kwargs})
