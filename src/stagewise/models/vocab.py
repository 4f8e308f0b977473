"""Vocabulary extension (DeepAnalyze stage 0) as a pure function on a model and its tokenizer.

Where we depart from DeepAnalyze's ``add_vocab.py`` (github.com/ruc-datalab/DeepAnalyze), and why:

* Its docstring promises an initialisation that its code never does; in practice the tags landed in untrained
  padding rows. We initialise each new row, in the input embedding and in an untied lm_head, as the mean of the
  rows of the sub-tokens that the tag's text had *before* it was added (``<Analyze>`` -> ``<``, ``Analy``, ``ze``,
  ``>``). The tag then starts as "what the model read when it saw that text", which keeps early loss sane.
* ``resize_token_embeddings(len(tokenizer))`` *shrinks* a padded matrix (Qwen3-8B: 151936 rows). We never shrink:
  if the new ids fit in the existing rows we only write those rows; otherwise we grow to a multiple of 64.
* Tags that are already single tokens are left alone, so running the stage twice changes nothing.
Tags are added as ordinary added tokens (``special=False``), as DeepAnalyze does, so decoding keeps them as text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

GROW_TO_MULTIPLE_OF = 64


@dataclass
class AddedToken:
    token: str
    id: int
    subtoken_ids: list[int]

    def sub_ids_tensor(self, device) -> torch.Tensor:
        return torch.tensor(self.subtoken_ids, dtype=torch.long, device=device)


def extend_vocabulary(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tokens: list[str],
                      init: str = "subtoken_mean") -> list[AddedToken]:
    """Add ``tokens`` that are missing as single tokens; return what was added (empty if nothing was)."""
    if init not in ("subtoken_mean", "random"):
        raise ValueError(f"stage.init={init!r} is not one of ['subtoken_mean', 'random']")
    vocab = tokenizer.get_vocab()
    missing = [t for t in dict.fromkeys(tokens) if t not in vocab]
    if not missing:
        return []
    sub_ids = {t: tokenizer.encode(t, add_special_tokens=False) for t in missing}
    tokenizer.add_tokens(missing)
    added = [AddedToken(t, tokenizer.convert_tokens_to_ids(t), sub_ids[t]) for t in missing]
    for a in added:
        if tokenizer.encode(a.token, add_special_tokens=False) != [a.id]:
            raise RuntimeError(f"token {a.token!r} does not encode to a single id after adding it")

    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=GROW_TO_MULTIPLE_OF, mean_resizing=False)

    tied = model.get_output_embeddings() is None or (
        model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    )
    matrices = [model.get_input_embeddings().weight]
    if not tied:
        matrices.append(model.get_output_embeddings().weight)
    with torch.no_grad():
        for w in matrices:
            for a in added:
                if init == "subtoken_mean":
                    w[a.id] = w[a.sub_ids_tensor(w.device)].float().mean(0).to(w.dtype)
                else:
                    w[a.id].normal_(0.0, float(w.float().std()))
    return added

