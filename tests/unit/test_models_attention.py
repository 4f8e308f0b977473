"""``sdpa_varlen`` (``auto``): a packed row runs one document at a time and equals each sequence run alone; every
other forward is transformers' sdpa, bit for bit. On a GPU with flash-attn the packed rows go through its varlen
kernel (the ``gpu`` tests)."""

import pytest
import torch

from stagewise.config import ModelConfig
from stagewise.models import load_model_and_tokenizer
from stagewise.models.attention import NAME, packed_forward_kwargs, shared_prefix_plan
from stagewise.models.loading import resolve_attn_implementation
from stagewise.training.modeling import pack_rows

LENGTHS = [3, 17, 40, 1]  # very different lengths, one single-token sequence
CU = torch.tensor([0, 3, 20, 60, 61], dtype=torch.int32)  # where each starts in the packed row


@pytest.fixture(scope="module")
def model():
    m, _ = load_model_and_tokenizer(ModelConfig())
    assert m.config._attn_implementation == NAME == resolve_attn_implementation("auto")  # no GPU here
    assert m.config.num_attention_heads > m.config.num_key_value_heads  # grouped-query attention is exercised
    return m.eval()


def sequences():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(10, 900, (n,), generator=g) for n in LENGTHS]


def test_packed_forward_kwargs_give_document_boundaries(model):
    packed = pack_rows([([5, 6], [7]), ([8], [9]), ([1, 2], [3, 4])], "cpu")
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    kw = packed_forward_kwargs(model, packed.cu_seq_lens)
    assert kw["cu_seq_lens_q"].tolist() == kw["cu_seq_lens_k"].tolist() == [0, 3, 5, 9]
    assert kw["cu_seq_lens_q"].device.type == "cpu"  # read per layer: no device sync
    assert kw["max_length_q"] == 4 and kw["attention_mask"] == {"full_attention": None, "sliding_attention": None}

    class Plain(torch.nn.Module):  # any other implementation: let transformers detect the packing itself
        config = type("C", (), {"_attn_implementation": "sdpa"})()

    assert packed_forward_kwargs(Plain(), packed.cu_seq_lens) == {"attention_mask": None}


def test_packed_row_equals_each_sequence_alone(model):
    seqs = sequences()
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False, output_hidden_states=True,
                       **packed_forward_kwargs(model, CU)).hidden_states[-1][0]
        alone = torch.cat([model(input_ids=s[None], use_cache=False, output_hidden_states=True).hidden_states[-1][0]
                           for s in seqs])
        # transformers' own route (dense block-diagonal mask from position_ids) agrees too
        masked = model(input_ids=ids, position_ids=pos, use_cache=False, output_hidden_states=True,
                       attention_mask=None).hidden_states[-1][0]
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked, alone, atol=1e-5, rtol=1e-5)
    # and the packed row really is one document at a time: without the boundaries the later documents differ
    with torch.no_grad():
        leaked = model(input_ids=ids, position_ids=pos, use_cache=False, output_hidden_states=True,
                       attention_mask={"full_attention": None, "sliding_attention": None}).hidden_states[-1][0]
    assert (leaked[LENGTHS[0]:] - alone[LENGTHS[0]:]).abs().max() > 1e-3


def test_gradients_equal_the_padded_batch(model):
    seqs = sequences()
    width = max(LENGTHS)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    attn = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], attn[i, :len(s)] = s, 1
    weight = torch.randn(sum(LENGTHS), model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    grads = []
    for packed in (False, True):
        model.zero_grad()
        if packed:
            pos = torch.cat([torch.arange(n) for n in LENGTHS])[None]
            hidden = model(input_ids=torch.cat(seqs)[None], position_ids=pos, use_cache=False,
                           output_hidden_states=True, **packed_forward_kwargs(model, CU)).hidden_states[-1][0]
        else:
            hidden = model(input_ids=ids, attention_mask=attn, use_cache=False,
                           output_hidden_states=True).hidden_states[-1][attn.bool()]
        (hidden * weight).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad()
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:  # fp32 sums in another order: tolerance relative to each gradient's scale
        scale = float(grads[0][name].abs().max())
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5 * max(1.0, scale), rtol=1e-4)


def test_ordinary_forward_is_plain_sdpa(model):
    """No cu_seq_lens (generation, padded batches): the same numbers as a model loaded with attn "sdpa"."""
    plain, _ = load_model_and_tokenizer(ModelConfig(attn_implementation="sdpa"))
    plain.load_state_dict(model.state_dict())
    ids = torch.randint(10, 900, (2, 12), generator=torch.Generator().manual_seed(2))
    attn = torch.ones_like(ids)
    attn[1, :5] = 0  # left padding
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
        b = plain.eval()(input_ids=ids, attention_mask=attn, use_cache=False).logits
    assert torch.equal(a, b)


def test_pack_rows_with_shared_prefix_lays_each_prompt_once():
    packed = pack_rows([([5, 6, 7], [11, 12]), ([5, 6, 7], [13]), ([5, 6, 7], []), ([9], [14, 15])], "cpu",
                       share_prefix=True)
    assert packed.input_ids.tolist() == [[5, 6, 7, 11, 12, 13, 9, 14, 15]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 2]]  # completions continue from the prompt
    # the last prompt token (2) predicts each completion's first token (11 and 13); 3 predicts 12; 6 predicts 14
    assert packed.predict_index.tolist() == [2, 3, 2, 6, 7]
    groups = packed.shared_prefix_layout.groups
    assert [(g.start, g.prompt_len, g.completion_lens) for g in groups] == [(0, 3, (2, 1, 0)), (6, 1, (2,))]
    assert packed.shared_prefix_layout.num_tokens == 9


def test_shared_prefix_plan_gathers_the_prompt_keys_for_each_completion():
    packed = pack_rows([([5, 6, 7], [11, 12]), ([5, 6, 7], [13]), ([5, 6, 7], []), ([9], [14, 15])], "cpu",
                       share_prefix=True)
    cu_q, cu_k, index = shared_prefix_plan(packed.shared_prefix_layout)
    # query segments in row order: prompt [0, 3), completion [3, 5), completion [5, 6) (the empty one has none),
    # prompt [6, 7), completion [7, 9); each completion's keys are its prompt's, then its own
    assert cu_q == (0, 3, 5, 6, 7, 9)
    assert index.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 5, 6, 6, 7, 8]
    assert cu_k == (0, 3, 8, 12, 13, 16)


def test_shared_prefix_row_equals_each_prompt_and_completion_alone(model):
    """Values and gradients of a row with prompts laid down once equal running each prompt + completion alone;
    a completion never sees its siblings (changing one leaves the others' hidden states as they were)."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(10, 900, (n,), generator=g).tolist() for n in (9, 2)]
    pairs = [(prompts[0], torch.randint(10, 900, (n,), generator=g).tolist()) for n in (5, 30, 1, 0)]
    pairs += [(prompts[1], torch.randint(10, 900, (n,), generator=g).tolist()) for n in (12, 3)]
    packed = pack_rows(pairs, "cpu", share_prefix=True)
    assert packed.input_ids.shape[1] == 9 + 2 + sum(len(c) for _, c in pairs)

    def shared_hidden(row):
        return model(input_ids=row.input_ids, position_ids=row.position_ids, use_cache=False,
                     output_hidden_states=True,
                     **packed_forward_kwargs(model, row.cu_seq_lens, row.shared_prefix_layout)).hidden_states[-1][0]

    weight = torch.randn(len(packed.predict_index), model.config.hidden_size, generator=g)
    results = []
    for shared in (False, True):
        model.zero_grad()
        if shared:
            hidden = shared_hidden(packed).index_select(0, packed.predict_index)
        else:  # each prompt + completion alone, the positions that predict completion tokens
            hidden = torch.cat([model(input_ids=torch.tensor([p + c]), use_cache=False, output_hidden_states=True)
                                .hidden_states[-1][0, len(p) - 1:len(p) + len(c) - 1] for p, c in pairs])
        (hidden * weight).sum().backward()
        results.append((hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                          if p.grad is not None}))
    model.zero_grad()
    (alone, g_alone), (shared, g_shared) = results
    torch.testing.assert_close(shared, alone, atol=1e-5, rtol=1e-5)
    assert g_shared.keys() == g_alone.keys() and len(g_alone) > 10
    for name in g_alone:
        scale = float(g_alone[name].abs().max())
        torch.testing.assert_close(g_shared[name], g_alone[name], atol=1e-5 * max(1.0, scale), rtol=1e-4)
    # a sibling changed: the first completion's hidden states stay, the changed one's move
    changed = [pairs[0], (pairs[1][0], [7] * 30)] + pairs[2:]
    with torch.no_grad():
        before = shared_hidden(packed)
        after = shared_hidden(pack_rows(changed, "cpu", share_prefix=True))
    torch.testing.assert_close(after[:9 + 5], before[:9 + 5], atol=1e-6, rtol=0)
    assert (after[14:44] - before[14:44]).abs().max() > 1e-3


def test_shared_prefix_layout_needs_sdpa_varlen():
    class Plain(torch.nn.Module):
        config = type("C", (), {"_attn_implementation": "flash_attention_2"})()

    packed = pack_rows([([5, 6], [7]), ([5, 6], [8])], "cpu", share_prefix=True)
    with pytest.raises(ValueError, match="sdpa_varlen"):
        packed_forward_kwargs(Plain(), packed.cu_seq_lens, packed.shared_prefix_layout)


@pytest.mark.gpu
@pytest.mark.parametrize("share_prefix", [False, True])
def test_flash_varlen_kernel_runs_packed_rows_as_each_sequence_alone(share_prefix):
    """On a GPU with flash-attn, bf16: ``sdpa_varlen``'s packed rows (plain and with shared prompts) go through
    flash-attention's varlen kernel and equal each prompt + completion run alone with transformers' sdpa."""
    pytest.importorskip("flash_attn")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from stagewise.models import attention

    m, _ = load_model_and_tokenizer(ModelConfig(), dtype=torch.bfloat16)
    m = m.cuda().eval()
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(10, 900, (9,), generator=g).tolist()
    pairs = [(prompt, torch.randint(10, 900, (n,), generator=g).tolist()) for n in (5, 30, 1)]
    packed = pack_rows(pairs, "cuda", share_prefix=share_prefix)
    assert attention._flash_runs(torch.zeros(1, device="cuda", dtype=torch.bfloat16))
    with torch.no_grad():
        row = m(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False,
                output_hidden_states=True, **packed_forward_kwargs(m, packed.cu_seq_lens, packed.shared_prefix_layout)
                ).hidden_states[-1][0]
        alone = [m(input_ids=torch.tensor([p + c], device="cuda"), use_cache=False, output_hidden_states=True)
                 .hidden_states[-1][0, len(p) - 1:len(p) + len(c) - 1] for p, c in pairs]
    got = row.index_select(0, packed.predict_index)
    torch.testing.assert_close(got.float(), torch.cat(alone).float(), atol=3e-2, rtol=3e-2)
