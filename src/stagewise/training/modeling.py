"""Model setup for training (LoRA via PEFT, gradient checkpointing, Liger kernels when available on a GPU) and the
one home of running the policy for per-token log-probs (shared-prefix, chunked, ZeRO-3 LM head)."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Protocol, Sequence

import torch

from stagewise.config import HardwareConfig, LoraConfig

if TYPE_CHECKING:
    from stagewise.models.attention import SharedPrefixLayout

log = logging.getLogger(__name__)


def liger_usable() -> bool:
    """liger-kernel is installed and a GPU is present (its kernels are Triton: CUDA only)."""
    return torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None


def apply_liger(model) -> bool:
    """Patch the model with Liger kernels (fused RMSNorm/SwiGLU/RoPE) when liger-kernel and a GPU are present. The
    fused linear cross-entropy is not patched into the model's forward (we never ask the model for a loss): SFT
    calls it itself (`sequence_nll_sum`)."""
    if not liger_usable():
        return False
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, fused_linear_cross_entropy=False, cross_entropy=False)
    log.info("Liger kernels applied")
    return True


def prepare_model(model, lora: LoraConfig, hardware: HardwareConfig):
    """LoRA (``model.lora``), gradient checkpointing (``hardware.gradient_checkpointing``), Liger (``use_liger``)."""
    if hardware.use_liger:
        apply_liger(model)
    if hardware.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if lora.enabled:
        from peft import LoraConfig as PeftLoraConfig, get_peft_model

        if hardware.gradient_checkpointing:
            model.enable_input_require_grads()
        model = get_peft_model(model, PeftLoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        log.info("LoRA r=%d alpha=%d: %.2fM of %.2fM params trainable", lora.r, lora.alpha, trainable / 1e6,
                 total / 1e6)
    return model


# ============================================================================================ log-probs
# The one place the policy is run for per-token log-probs: SFT's loss and eval loss (`sequence_token_logprobs`),
# GRPO's policy, old and reference log-probs (`completion_logprobs`). Generation-only stages (eval, rejection
# sampling) score text with rewards and never need them.
#
# ZeRO-3 and the LM head. Under ZeRO-3 every weight is a partitioned placeholder (``numel() == 0``, a ``ds_id``)
# outside its own module's call: ZeRO-3's hooks gather it when the module is called and again when backward reaches
# the module's outputs. The rule here (`head_logprobs`): the whole chunked log-prob computation runs as *one* call of
# the head module, so the weight is gathered once for forward and once for backward, however many chunks the
# completions span (TRL gathers the head around its own log-prob code for the same reason). The log-probs stay
# chunked, ``O(chunk_size x V)`` memory, which is the point of the chunking: ZeRO-3 is what a model too large for one
# device runs under, and it is where full logits hurt most. Rejected rules: asking the model for its own logits over
# every completion position (``[B, T, V]`` at once: with Qwen's 152K vocabulary and 8K-token completions that is
# gigabytes per sequence), and calling the head module once per chunk (a gather per chunk, and again per chunk when
# backward recomputes it). `tests/integration/test_zero3_lm_head.py` counts the gathers on 2 CPU processes and checks
# the values and gradients against one process without DeepSpeed.

# below this many bytes of completion logits (64 MiB: a few thousand tokens of a 1K vocabulary, a few hundred of
# Qwen's 152K) one plain LM-head matmul is kept for backward instead of recomputing chunks
SMALL_LOGITS_BYTES = 64 * 2**20


def head_is_partitioned(head) -> bool:
    """True when DeepSpeed ZeRO-3 partitions the LM head's weight (a placeholder outside the module's call)."""
    return hasattr(head.weight, "ds_id") or head.weight.numel() == 0


def _in_head_call(head, compute, *args):
    """``compute(*args)`` run as one call of the head module when ZeRO-3 partitions its weight (its hooks gather the
    weight once for forward and once for backward: see the note above), else called directly."""
    if not head_is_partitioned(head):
        return compute(*args)
    head.forward = compute  # an instance attribute shadows the class's forward for this one call
    try:
        return head(*args)
    finally:
        del head.forward


def head_logprobs(head, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int, temperature: float,
                  with_entropy: bool = False, entropy_grad: bool = True, mask: torch.Tensor | None = None):
    """``log softmax(head(hidden) / temperature)[targets]`` (and the entropy), ``hidden [B, T, H]`` -> ``[B, T]`` each,
    through the head's weight ``chunk_size`` tokens at a time (`chunked_token_logprobs`), or with one plain matmul
    kept for backward when all the logits fit in ``SMALL_LOGITS_BYTES``. ``mask``: only those tokens are computed.
    Under ZeRO-3 this runs as one call of the head module (see the note above)."""
    from stagewise.algorithms import chunked_token_logprobs, token_logprobs_from_logits

    kw = dict(temperature=temperature, with_entropy=with_entropy, entropy_grad=entropy_grad)

    def compute(hidden: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None):
        weight = head.weight  # the full weight here, also under ZeRO-3 (inside the head's call)
        if mask is None and targets.numel() * vocab_size(head) * 4 <= SMALL_LOGITS_BYTES:
            return token_logprobs_from_logits(torch.nn.functional.linear(hidden, weight), targets, **kw)
        return chunked_token_logprobs(hidden, weight, targets, chunk_size, mask=mask, **kw)

    return _in_head_call(head, compute, hidden, targets, mask)


def vocab_size(head) -> int:
    """Rows of the LM head, also when ZeRO-3 has partitioned its weight away."""
    weight = head.weight
    return int(weight.ds_shape[0]) if hasattr(weight, "ds_shape") else int(getattr(head, "out_features",
                                                                                   weight.shape[0]))


def final_hidden(model, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, cu_seq_lens: torch.Tensor | None = None,
                 shared_prefix_layout: "SharedPrefixLayout | None" = None) -> torch.Tensor:
    """The final-norm hidden states ``[B, T, H]`` from the wrapped model's own forward (so DDP/DeepSpeed/PEFT hooks
    run), with ``logits_to_keep`` set to a single position: no full-vocabulary logits are built. ``cu_seq_lens``:
    ``input_ids`` is one packed row of sequences starting at those offsets, ``position_ids`` restarting at 0 for
    each (`PackedRows`, `stagewise.models.attention`); ``shared_prefix_layout``: the row shares prompts that way."""
    from stagewise.models.attention import packed_forward_kwargs

    keep = torch.tensor([input_ids.shape[1] - 1], device=input_ids.device)
    extra = (packed_forward_kwargs(model, cu_seq_lens, shared_prefix_layout) if cu_seq_lens is not None
             else {"attention_mask": attention_mask})
    out = model(input_ids=input_ids, position_ids=position_ids, output_hidden_states=True, logits_to_keep=keep,
                use_cache=False, **extra)
    return out.hidden_states[-1]


def _output_head(model):
    inner = model.module if hasattr(model, "module") else model
    return inner.get_output_embeddings()


def sequence_token_logprobs(model, input_ids: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                            attention_mask: torch.Tensor | None = None, cu_seq_lens: torch.Tensor | None = None,
                            chunk_size: int = 1024,
                            temperature: float = 1.0, with_entropy: bool = False,
                            mask: torch.Tensor | None = None):
    """``log p(x_{t+1} | x_<=t)`` for every position, shape [B, T-1] (and the entropy if asked), without ever
    materialising full-vocabulary logits for the whole batch: `final_hidden`, then the LM head chunk by chunk in
    ``chunked_token_logprobs``. ``mask [B, T-1]``: only those positions go through the LM head (SFT's trained
    tokens: prompt, padding and Execute output never pay for a ``[*, V]`` projection); the others are 0.
    ``cu_seq_lens``: ``input_ids`` is one row of documents starting there (`SFTCollator` with ``flatten``)."""
    hidden = final_hidden(model, input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          cu_seq_lens=cu_seq_lens)[:, :-1]
    return head_logprobs(_output_head(model), hidden, input_ids[:, 1:], chunk_size, temperature,
                         with_entropy=with_entropy, mask=mask)


def sequence_nll_sum(model, input_ids: torch.Tensor, mask: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                     attention_mask: torch.Tensor | None = None, cu_seq_lens: torch.Tensor | None = None,
                     chunk_size: int = 1024, fused_ce: bool = False) -> torch.Tensor:
    """SFT's summed loss ``-sum log p(x_{t+1} | x_<=t)`` over the positions in ``mask [B, T-1]``, a scalar.

    ``fused_ce`` (``hardware.use_liger`` with liger-kernel on a GPU): Liger's fused linear cross-entropy over the
    trained tokens' hidden states (no logits kept: the head's gradient is computed chunk by chunk during forward, in
    Triton). Its ``reduction="sum"`` is used, never ``"none"``: Liger's backward scales its stored gradient by a
    scalar upstream gradient, which a sum divided by SFT's fixed normaliser is. Otherwise `sequence_token_logprobs`
    (our chunked head) summed over the mask; both give the same value and gradients (the GPU test)."""
    if not fused_ce:
        logprobs, _ = sequence_token_logprobs(model, input_ids, position_ids=position_ids,
                                              attention_mask=attention_mask, cu_seq_lens=cu_seq_lens,
                                              chunk_size=chunk_size, mask=mask)
        return -(logprobs * mask).sum()
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    hidden = final_hidden(model, input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          cu_seq_lens=cu_seq_lens)[:, :-1]
    trained = mask.bool()
    head = _output_head(model)
    fused = LigerFusedLinearCrossEntropyLoss(reduction="sum")

    def compute(hidden: torch.Tensor, targets: torch.Tensor):
        out = fused(head.weight, hidden, targets, getattr(head, "bias", None))
        return out[0] if isinstance(out, tuple) else out

    return _in_head_call(head, compute, hidden[trained], input_ids[:, 1:][trained])


@dataclass
class PackedRows:
    """A micro-batch of prompt + completion sequences as one unpadded row (verl's ``use_remove_padding``, OpenRLHF's
    ``packing_samples``): no pad token goes through any layer. ``position_ids`` restart at 0 for each sequence and
    no attention mask is passed: ``sdpa_varlen`` (the CPU default) attends within each sequence from
    ``cu_seq_lens``, flash-attention runs varlen from the positions, plain sdpa/eager get transformers'
    block-diagonal mask (`stagewise.models.attention`). With ``shared_prefix_layout`` set, consecutive sequences with the
    same prompt carry it once (``[prompt, completion_1, ..., completion_n]``, each completion's positions
    continuing from the prompt; ``sdpa_varlen`` only)."""

    input_ids: torch.Tensor  # [1, nnz]
    position_ids: torch.Tensor  # [1, nnz]
    cu_seq_lens: torch.Tensor  # [S + 1] int32 on the CPU: where each sequence (each group when shared) starts
    predict_index: torch.Tensor  # [N]: the packed position whose hidden state predicts each completion token,
    #                              in the row-major order of the padded ``tokens`` mask
    shared_prefix_layout: Optional["SharedPrefixLayout"] = None


def group_by_prompt(sequences: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[Sequence[int], list]]:
    """Consecutive sequences with equal prompts as ``[(prompt, [completion, ...]), ...]``, order kept."""
    groups: list[tuple[Sequence[int], list]] = []
    for prompt, completion in sequences:
        if groups and list(groups[-1][0]) == list(prompt):
            groups[-1][1].append(completion)
        else:
            groups.append((prompt, [completion]))
    return groups


def pack_rows(sequences: Sequence[tuple[Sequence[int], Sequence[int]]], device,
              share_prefix: bool = False) -> PackedRows:
    """``[(prompt_ids, completion_ids), ...]`` -> `PackedRows` (every prompt non-empty). ``share_prefix``: a run
    of sequences with one prompt lays it down once (see `PackedRows`)."""
    from stagewise.models.attention import SharedPrefixLayout, sequence_starts

    groups = (group_by_prompt(sequences) if share_prefix
              else [(prompt, [completion]) for prompt, completion in sequences])
    ids: list[int] = []
    positions: list[int] = []
    predict: list[int] = []
    for prompt, completions in groups:
        last_prompt = len(ids) + len(prompt) - 1  # its hidden state predicts every completion's first token
        ids.extend(prompt)
        positions.extend(range(len(prompt)))
        for completion in completions:
            start = len(ids)
            predict.extend([last_prompt] + list(range(start, start + len(completion) - 1))
                           if completion else [])
            ids.extend(completion)
            positions.extend(range(len(prompt), len(prompt) + len(completion)))
    as_row = lambda xs: torch.tensor([xs], dtype=torch.long, device=device)  # noqa: E731
    layout = SharedPrefixLayout.build([(len(p), [len(c) for c in cs]) for p, cs in groups]) if share_prefix else None
    return PackedRows(input_ids=as_row(ids), position_ids=as_row(positions),
                      cu_seq_lens=sequence_starts(positions),
                      predict_index=torch.tensor(predict, dtype=torch.long, device=device),
                      shared_prefix_layout=layout)


class CompletionRows(Protocol):
    """What `completion_logprobs` reads from a batch of prompt + completion rows (GRPO's ``MicroBatch``)."""

    input_ids: torch.Tensor  # [B, P + T]: left-padded prompts then right-padded completions
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    prompt_width: int  # P
    targets: torch.Tensor  # [B, T] completion ids, -1 at padding
    tokens: torch.Tensor  # [B, T] bool: real completion tokens
    prompt_index: Optional[torch.Tensor]  # [B]: which distinct prompt (of `unique_rows`) each row has
    unique_rows: Optional[torch.Tensor]  # [U]: the first row of each distinct prompt; set: run each prompt once
    packed: Optional[PackedRows]  # set: the model runs on this unpadded row instead of ``input_ids``


def completion_logprobs(model, head, mb: CompletionRows, chunk_size: int, temperature: float,
                        with_entropy: bool = False, entropy_grad: bool = True):
    """Log-probs (and entropies) of the completion tokens, ``[B, T]`` each (0 on padding).

    The model's own forward runs (so DDP/DeepSpeed/PEFT hooks do) with one kept logit, and only the completion
    tokens' final hidden states go through the LM head ``head``. Those logits are built ``chunk_size`` tokens at a
    time and recomputed in backward (`chunked_token_logprobs`) unless all of them fit in ``SMALL_LOGITS_BYTES``,
    where one plain matmul is kept instead. Under ZeRO-3 the head module is called (see the note above).

    ``mb.unique_rows`` set (`RowLayout.PADDED_SHARED_PREFIX`): the rows of a group share one prompt, so each
    distinct prompt is run once (with gradients) and its KV cache is indexed out to its rows before the completions
    run: exact, and n times less prompt compute (a group's 8 samples of an R1-Zero prompt: half the tokens of the
    step). Not under gradient checkpointing, which drops the KV cache (packed rows share prompts under checkpointing
    too).

    ``mb.packed`` (``hardware.max_tokens_per_micro_batch`` > 0): the model runs on one unpadded row instead, and the
    hidden states that predict completion tokens are picked out of it; values equal the padded path's. When the
    row shares prompts (``mb.packed.shared_prefix_layout``), each prompt runs once in it, with or without
    checkpointing.
    """
    if mb.packed is not None:
        hidden = final_hidden(model, mb.packed.input_ids, position_ids=mb.packed.position_ids,
                              cu_seq_lens=mb.packed.cu_seq_lens,
                              shared_prefix_layout=mb.packed.shared_prefix_layout)
        selected = hidden[0].index_select(0, mb.packed.predict_index)  # [N, H]
    else:
        if mb.unique_rows is not None:
            hidden = shared_prefix_hidden(model, mb)
        else:
            t = mb.targets.shape[1]
            hidden = final_hidden(model, mb.input_ids, attention_mask=mb.attention_mask,
                                  position_ids=mb.position_ids)[:, mb.prompt_width - 1:mb.prompt_width - 1 + t]
        selected = hidden[mb.tokens]  # [N, H], row-major like the packed order
    targets = mb.targets[mb.tokens][None]  # [1, N]
    lp, ent = head_logprobs(head, selected[None], targets, chunk_size, temperature, with_entropy=with_entropy,
                            entropy_grad=entropy_grad)
    zeros = torch.zeros(mb.targets.shape, dtype=lp.dtype, device=lp.device)
    return (zeros.masked_scatter(mb.tokens, lp[0]),
            zeros.masked_scatter(mb.tokens, ent[0]) if with_entropy else None)


def shared_prefix_hidden(model, mb: CompletionRows) -> torch.Tensor:
    """Final hidden states ``[B, T, H]`` that predict the completion tokens, with each distinct prompt run once.
    The prompt pass goes through the inner module (a DDP wrapper expects one forward per backward); gradients
    reach the prompt's weights through the KV cache and the last prompt position."""
    from transformers import DynamicCache

    inner = getattr(model, "module", model)
    pw, u = mb.prompt_width, mb.unique_rows
    one = torch.tensor([pw - 1], device=mb.input_ids.device)
    cache = DynamicCache()
    prompt = inner(input_ids=mb.input_ids[u, :pw], attention_mask=mb.attention_mask[u, :pw],
                   position_ids=mb.position_ids[u, :pw], past_key_values=cache, use_cache=True,
                   output_hidden_states=True, logits_to_keep=one)
    last = prompt.hidden_states[-1][:, -1]  # [U, H]: predicts each prompt's first completion token
    cache.batch_select_indices(mb.prompt_index)
    keep = torch.tensor([mb.targets.shape[1] - 1], device=mb.input_ids.device)
    out = model(input_ids=mb.input_ids[:, pw:], attention_mask=mb.attention_mask,
                position_ids=mb.position_ids[:, pw:], past_key_values=cache, use_cache=True,
                output_hidden_states=True, logits_to_keep=keep)
    return torch.cat([last[mb.prompt_index][:, None], out.hidden_states[-1][:, :-1]], dim=1)
