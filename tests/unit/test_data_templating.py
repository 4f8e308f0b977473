"""Tokenisation and loss masks: exact trained ids, Execute masking, fallback templates, over-long rows, cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset

from stagewise.config import DataConfig
from stagewise.data import VocabError, tokenize_sft
from stagewise.data.schema import merge_execute_messages
from stagewise.data.templating import (
    TokenizeStats,
    assistant_char_spans,
    encode_conversations,
    execute_span_mask,
    execute_tag_ids,
)
from stagewise.models import tiny_tokenizer
from stagewise.models.tiny_tokenizer import CHAT_TEMPLATE

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def user(c):
    return {"role": "user", "content": c}


def assistant(c):
    return {"role": "assistant", "content": c}


# A two-turn DeepAnalyze trajectory. Turn 1 = A1 + Execute span + answer; turn 2 = A2 + Execute span + answer.
A1 = "<Analyze>Load it.</Analyze>\n<Code>\n```python\nprint(1)\n```\n</Code>\n"
A2 = "<Code>\nprint(2)\n</Code>\n"
INLINE = [
    user("# Instruction\nMean price?"),
    assistant(A1 + "<Execute>\n1\n</Execute>\n<Answer>1</Answer>"),
    user("Doubled?"),
    assistant(A2 + "<Execute>\n2\n</Execute>\n<Answer>2</Answer>"),
]
EXECUTE_ROLE = [
    user("# Instruction\nMean price?"),
    assistant(A1), {"role": "execute", "content": "1"}, assistant("<Answer>1</Answer>"),
    user("Doubled?"),
    assistant(A2), {"role": "execute", "content": "2"}, assistant("<Answer>2</Answer>"),
]
# The tiny tokenizer's ids (tags are single added tokens: <Analyze>=1028 </Analyze>=1029 <Code>=1032
# </Code>=1033 <Execute>=1034 </Execute>=1035 <Answer>=1036 </Answer>=1037; "\n"=201, <|im_end|>=2).
A1_IDS = [1028, 445, 769, 16, 1029, 201, 1032, 201, 358, 443, 201, 438, 10, 19, 11, 201, 358, 201, 1033, 201]
A2_IDS = [1032, 201, 438, 10, 20, 11, 201, 1033, 201]
# Trained: each turn's text outside the Execute span (the "\n" after </Execute> included), its answer and the
# closing <|im_end|>. Not trained: system/user turns, "<|im_start|>assistant\n", <Execute>\n1\n</Execute>, the "\n"
# after <|im_end|>.
TRAINED_IDS = A1_IDS + [201, 1036, 19, 1037, 2] + A2_IDS + [201, 1036, 20, 1037, 2]


def _rows(ds):
    return [(r["input_ids"], r["loss_mask"]) for r in ds]


def _tokenize(tok, convs, **cfg):
    ds = Dataset.from_list([{"messages": c, "source": "t"} for c in convs])
    return tokenize_sft(ds, tok, DataConfig(**cfg), use_cache=False)


def test_trained_ids_on_deepanalyze_trajectory_are_exact(tok):
    assert execute_tag_ids(tok) == (1034, 1035)
    assert tok.encode(A1, add_special_tokens=False) == A1_IDS and tok.encode(A2, add_special_tokens=False) == A2_IDS
    out, stats = _tokenize(tok, [INLINE])
    ids, mask = out[0]["input_ids"], out[0]["loss_mask"]
    assert [t for t, m in zip(ids, mask) if m] == TRAINED_IDS
    assert stats.trained_tokens == len(TRAINED_IDS) == 39
    # both Execute spans, tags included, carry no loss
    spans = [(i, ids.index(1035, i)) for i, t in enumerate(ids) if t == 1034]
    assert [(ids[a + 1:b]) for a, b in spans] == [[201, 19, 201], [201, 20, 201]]
    assert all(mask[k] == 0 for a, b in spans for k in range(a, b + 1))
    # the user turns are untrained and the text decodes back to the chat template's rendering
    assert tok.decode(ids) == tok.apply_chat_template(INLINE, tokenize=False)


def test_execute_role_and_inline_forms_give_identical_ids_and_masks(tok):
    assert merge_execute_messages(EXECUTE_ROLE) == INLINE
    # the tokenizer's own template renders role: execute to the very same text
    assert tok.apply_chat_template(EXECUTE_ROLE, tokenize=False) == tok.apply_chat_template(INLINE, tokenize=False)
    out, _ = _tokenize(tok, [INLINE, EXECUTE_ROLE])
    assert out[0]["input_ids"] == out[1]["input_ids"]
    assert out[0]["loss_mask"] == out[1]["loss_mask"]


def test_mask_execute_false_trains_the_execute_spans(tok):
    out, stats = _tokenize(tok, [INLINE], mask_execute=False)
    # 2 spans x (<Execute>, \n, digit, \n, </Execute>) become trained
    assert stats.trained_tokens == len(TRAINED_IDS) + 10


@pytest.mark.parametrize(
    "ids, expected",
    [
        ([5, 1034, 6, 1035, 7], [0, 1, 1, 1, 0]),  # one span, both tags
        ([1034, 6, 1035, 1034, 1035], [1, 1, 1, 1, 1]),  # two spans back to back
        ([5, 1034, 6, 7], [0, 1, 1, 1]),  # unclosed (truncated) span masks to the end
        ([5, 1035, 6], [0, 1, 0]),  # a stray closing tag masks only itself
        ([5, 6], [0, 0]),
    ],
)
def test_execute_span_mask_cases(ids, expected):
    assert execute_span_mask(np.array(ids), 1034, 1035).astype(int).tolist() == expected


def test_fallback_without_generation_markers_matches_marker_path(tok):
    """A template with the markers stripped goes through the render-and-diff fallback and must agree exactly."""
    plain = tiny_tokenizer()
    plain.chat_template = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    convs = [merge_execute_messages(c) for c in (INLINE, [user("hi"), assistant("yo")])]
    marked, fallback = encode_conversations(tok, convs), encode_conversations(plain, convs)
    for (ids_a, mask_a), (ids_b, mask_b) in zip(marked, fallback):
        assert ids_a == ids_b and mask_a.tolist() == mask_b.tolist()


def test_fallback_on_qwen3_template_trains_every_turn_despite_history_rewrite(tok):
    """Qwen3's template drops earlier turns' <think> and re-renders the last turn's; spans must follow it."""
    qwen = tiny_tokenizer()
    qwen.chat_template = (FIXTURES / "qwen3_chat_template.jinja").read_text()
    conv = [user("Hi"), assistant("<think>\nr1\n</think>\n\nA1"),
            user("Again"), assistant("<think>\nr2\n</think>\n\nA2")]
    text = qwen.apply_chat_template(conv, tokenize=False)
    assert text == ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nAgain"
                    "<|im_end|>\n<|im_start|>assistant\n<think>\nr2\n</think>\n\nA2<|im_end|>\n")
    assert [text[s:e] for s, e in assistant_char_spans(qwen, conv, text)] == [
        "A1<|im_end|>", "<think>\nr2\n</think>\n\nA2<|im_end|>"]
    [(ids, mask)] = encode_conversations(qwen, [conv])
    assert qwen.decode([i for i, m in zip(ids, mask) if m]) == "A1<|im_end|><think>\nr2\n</think>\n\nA2<|im_end|>"


def test_missing_single_token_tags_asks_for_stage_vocab():
    bare = tiny_tokenizer(with_deepanalyze_tags=False)
    assert execute_tag_ids(bare) is None
    with pytest.raises(VocabError, match="stage=vocab"):
        _tokenize(bare, [INLINE])
    # data without Execute spans does not need the tags
    out, _ = _tokenize(bare, [[user("hi"), assistant("yo")]])
    assert len(out) == 1


# "hi"/"yo" renders to 18 tokens: <|im_start|> user \n hi <|im_end|> \n <|im_start|> assistant(5 tokens) \n y o
# <|im_end|> \n, with y, o and <|im_end|> (positions 14, 15, 16) trained.
SHORT = [user("hi"), assistant("yo")]
NO_ASSISTANT = [user("hi")]


@pytest.mark.parametrize(
    "overlong, max_length, rows_out, dropped, truncated, trained",
    [
        ("drop", 18, 1, 0, 0, 3),
        ("drop", 17, 0, 1, 0, 0),
        ("truncate", 17, 1, 0, 1, 3),  # cut after <|im_end|>: all 3 targets kept
        ("truncate", 16, 1, 0, 1, 2),  # <|im_end|> cut off
        ("truncate", 14, 0, 0, 0, 0),  # nothing trained survives: dropped as no-target, not counted as truncated
    ],
)
def test_overlong_drop_and_truncate_counts(tok, overlong, max_length, rows_out, dropped, truncated, trained):
    out, stats = _tokenize(tok, [SHORT, NO_ASSISTANT], overlong=overlong, max_length=max_length)
    assert (stats.rows_in, stats.rows_out, stats.overlong_dropped, stats.truncated) == (2, rows_out, dropped, truncated)
    assert stats.no_target_dropped == 2 - rows_out - dropped
    assert stats.trained_tokens == trained
    if rows_out:
        assert out[0]["length"] == min(18, max_length) == len(out[0]["input_ids"])
        assert out[0]["loss_mask"][14:17] == [1, 1, 1][: max(0, max_length - 14)]


def _fixture_ds(n=40):
    from stagewise.data.generators import arithmetic

    return Dataset.from_list([{**r, "source": "arith"} for r in arithmetic(n, seed=3)])


def test_cache_hit_on_rerun_and_miss_on_changed_options(tok, tmp_path):
    cfg = DataConfig(max_length=128)
    first, s1 = tokenize_sft(_fixture_ds(), tok, cfg, cache_dir=str(tmp_path))
    again, s2 = tokenize_sft(_fixture_ds(), tok, cfg, cache_dir=str(tmp_path))  # a fresh, equal dataset
    assert (s1.cache_hit, s2.cache_hit) == (False, True)
    assert s1.fingerprint == s2.fingerprint and len(list(tmp_path.glob("sft-*"))) == 1
    assert _rows(first) == _rows(again) and s2.trained_tokens == s1.trained_tokens > 0
    _, s3 = tokenize_sft(_fixture_ds(), tok, DataConfig(max_length=64), cache_dir=str(tmp_path))
    _, s4 = tokenize_sft(_fixture_ds().select(range(39)), tok, cfg, cache_dir=str(tmp_path))
    assert not s3.cache_hit and not s4.cache_hit and len({s1.fingerprint, s3.fingerprint, s4.fingerprint}) == 3
    assert not list(tmp_path.glob(".tmp-*"))  # no staging leftovers


def test_multiprocess_tokenisation_equals_single_process(tok, tmp_path):
    one, _ = tokenize_sft(_fixture_ds(), tok, DataConfig(max_length=128), use_cache=False)
    two, _ = tokenize_sft(_fixture_ds(), tok, DataConfig(max_length=128, num_proc=2), cache_dir=str(tmp_path))
    assert _rows(one) == _rows(two)


def test_stats_rows_per_s():
    assert TokenizeStats(rows_in=100, seconds=0.5).rows_per_s == 200.0
