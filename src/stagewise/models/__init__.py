from stagewise.models.loading import (
    frozen_copy,
    ModelNotFoundError,
    load_model_and_tokenizer,
    load_tokenizer,
    num_params,
    resolve_dtype,
)
from stagewise.models.tiny import TINY_NAME, build_tiny, tiny_tokenizer

__all__ = [
    "frozen_copy",
    "ModelNotFoundError", "load_model_and_tokenizer", "load_tokenizer", "num_params", "resolve_dtype",
    "TINY_NAME", "build_tiny", "tiny_tokenizer",
]
