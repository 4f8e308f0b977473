"""The data layer: sources -> one chat schema -> tokenised SFT rows (packed or padded) or RL prompts.

    load_sources(data_cfg)                     -> DataSplits(train, eval, report)   chat rows + metadata
    tokenize_sft(ds, tokenizer, data_cfg)      -> (Dataset, TokenizeStats)          input_ids, loss_mask, length
    pack(lengths, max_length)                  -> bins (best-fit-decreasing);  PackedDataset, SFTCollator
    load_prompt_dataset(data_cfg, tokenizer)   -> PromptData(train, eval, report, stats)
    GENERATORS                                 offline data for ``path: generator:<name>``
"""

from stagewise.data.generators import GENERATORS
from stagewise.data.mixture import DataSplits, MixtureReport, SourceReport, load_source, load_sources
from stagewise.data.packing import IGNORE_INDEX, PackedDataset, SFTCollator, pack, packing_efficiency
from stagewise.data.prompts import PromptData, PromptStats, build_prompts, load_prompt_dataset
from stagewise.data.schema import BadRowError, merge_execute_messages
from stagewise.data.sources import ADAPTERS, detect_adapter
from stagewise.data.templating import TokenizeStats, VocabError, tokenize_sft

__all__ = [
    "ADAPTERS", "BadRowError", "DataSplits", "GENERATORS", "IGNORE_INDEX", "MixtureReport", "PackedDataset",
    "PromptData", "PromptStats", "SFTCollator", "SourceReport", "TokenizeStats", "VocabError", "build_prompts",
    "detect_adapter", "load_prompt_dataset", "load_source", "load_sources", "merge_execute_messages", "pack",
    "packing_efficiency", "tokenize_sft",
]
