"""Typed config schemas: every default of the project lives here.

`train.yaml` composes one YAML per group on top of `TrainConfig`, which is registered in Hydra's ConfigStore
as ``train_schema``. Because the schema is a structured config, a key that is not declared here or a value of
the wrong type fails at compose time, and OmegaConf's error names the full key (e.g. ``stage.learning_rte``).

Groups and what they hold (see README "Config reference"):
    model      which checkpoint, dtype, attention, LoRA, the tiny offline model's shape
    data       sources (jsonl/parquet/arrow/HF id/generator), adapters, mixture, lengths, packing
    stage      which recipe runs (vocab, sft, grpo, rejection_sampling, eval) and its optimisation schedule
    algorithm  the objective inside the stage (sft; grpo, dr_grpo, dapo, gspo): one file is one variant
    hardware   processes, precision, DeepSpeed ZeRO stage/offload, micro-batch and accumulation
    reward     weighted reward functions          env      single-turn or code-execution environment
    rollout    generation backend and sampling    logger   console/jsonl plus optional W&B/TensorBoard
    paths      where runs and caches go           pipeline an ordered list of stages with overrides
Secrets (API keys) are never config values: configs name the *environment variable* that holds them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

DEEPANALYZE_TAGS: List[str] = [
    "<Analyze>", "</Analyze>", "<Understand>", "</Understand>", "<Code>", "</Code>",
    "<Execute>", "</Execute>", "<Answer>", "</Answer>",
]
REASONING_TAGS: List[str] = ["<think>", "</think>", "<answer>", "</answer>"]

# DeepSeek-R1-Zero's template (arXiv:2501.12948, table 1) as a system prompt. No code injects it: the data YAMLs of
# R1-Zero-style prompt sets (countdown, countdown_tiny, deepscaler, numina_tir) carry this text as data.system_prompt.
R1_ZERO_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
    "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>"
)


# --------------------------------------------------------------------------------------------------- model
@dataclass
class TinyModelConfig:
    """Shape of the offline Qwen3-architecture model built when ``model.name_or_path == "stagewise-tiny"``."""

    seed: int = 0
    hidden_size: int = 192
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    # 6 x 32 = hidden_size: a head size vLLM's CPU attention supports (32, 64, 80, ...; not 48), with the same
    # parameter count as the 4 x 48 it replaced
    num_attention_heads: int = 6
    num_key_value_heads: int = 3
    head_dim: int = 32
    max_position_embeddings: int = 4096
    # Pad the embedding matrix to a multiple of this, as Qwen checkpoints do (151936 rows for ~151.7K tokens).
    pad_vocab_to_multiple_of: int = 64
    tie_word_embeddings: bool = False
    # Ship the DeepAnalyze action tags as single tokens (set false to exercise stage=vocab on a bare vocab).
    with_deepanalyze_tags: bool = True


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 64
    alpha: int = 32
    dropout: float = 0.0
    target_modules: List[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class ModelConfig:
    name_or_path: str = "stagewise-tiny"
    revision: Optional[str] = None
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    # auto = sdpa_varlen: sdpa, with packed rows run one document at a time (flash-attention's varlen kernel on a
    # GPU where flash-attn is installed) and GRPO prompts shared across samples (stagewise.models.attention)
    attn_implementation: str = "auto"  # auto | eager | sdpa | sdpa_varlen | flash_attention_2
    trust_remote_code: bool = False
    tokenizer: Optional[str] = None  # defaults to name_or_path
    chat_template: Optional[str] = None  # a jinja string or a path to a .jinja file; overrides the tokenizer's
    lora: LoraConfig = field(default_factory=LoraConfig)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


# ---------------------------------------------------------------------------------------------------- data
@dataclass
class SourceConfig:
    """One data source. ``path`` is a local file/folder, an HF hub id, or ``generator:<name>``."""

    path: str = MISSING
    # messages | prompt_completion | bespoke_stratos | numina_tir | deepanalyze | deepanalyze_rl | countdown | auto
    adapter: str = "auto"
    split: str = "train"
    name: Optional[str] = None  # label used in the mixture report; defaults to the file stem
    num_samples: Optional[int] = None  # an absolute count (sampled with replacement only if larger than the source)
    ratio: Optional[float] = None  # or a fraction of the source
    generator_kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    sources: List[SourceConfig] = field(default_factory=list)
    eval_sources: List[SourceConfig] = field(default_factory=list)
    eval_fraction: float = 0.0  # held out from `sources` when no eval_sources are given
    max_length: int = 2048
    overlong: str = "drop"  # drop (ms-swift `delete`) | truncate
    packing: bool = False
    on_bad_row: str = "error"  # error | skip
    # Replaces every conversation's system message, in SFT data and in prompts alike ("" = none); None keeps the
    # data's own. Each data YAML sets its default (the R1-Zero-style prompt sets carry R1_ZERO_SYSTEM_PROMPT's text).
    system_prompt: Optional[str] = None
    num_proc: int = 1
    cache_dir: Optional[str] = None  # defaults to ${paths.cache_dir}/tokenized
    max_prompt_length: int = 1024
    # Execute spans (`<Execute>`..`</Execute>`, both tags) carry no loss: DeepAnalyze's SFT rule.
    mask_execute: bool = True
    seed: int = 0


# --------------------------------------------------------------------------------------------------- stage
# One schema per stage, each registered in Hydra's ConfigStore as `stage/base_<name>` and named by its YAML's
# defaults list (`- base_sft@stage`). A stage has exactly the fields it reads: `stage=sft stage.prompts_per_step=64`
# fails (see `validate_config`). The schemas are flat (`stage.learning_rate`, not `stage.optim.learning_rate`) and
# built from the shared blocks below by inheritance, so that a block's fields mean the same thing in every stage.
# Bases are listed last-block-first: a dataclass orders fields from the last base to the first, and `name` should
# print first.
@dataclass
class StageBase:
    """What every stage has: which stage file runs. With no ``stage=`` chosen (a pipeline run) it is ``none``."""

    name: str = "none"  # vocab | sft | grpo | rejection_sampling | eval


@dataclass
class OptimiserBlock:
    """AdamW and the update guard (stagewise.training.optim, stagewise.tracking.alerts.NanGuard)."""

    learning_rate: float = 1e-4
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    max_grad_norm: float = 1.0  # 0 = no clipping
    max_nonfinite_steps: int = 5  # NaN/inf losses in a row before the run stops (each one skips its update)


@dataclass
class ScheduleBlock:
    """How long the stage trains and how its learning rate moves."""

    lr_scheduler: str = "cosine"  # cosine | linear | constant | constant_with_warmup
    warmup_ratio: float = 0.05
    num_epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides num_epochs
    logging_steps: int = 1


@dataclass
class CheckpointBlock:
    save_steps: int = 0  # 0 = only final/
    save_total_limit: int = 2


@dataclass
class ScoringBlock:
    """When a completion counts as correct/accepted (stagewise.evaluation.acceptance_scores): its score is at least
    ``acceptance_threshold``, the score being the reward function ``score_reward`` (its display name) or, when None,
    the weighted mean of all reward functions (weighted total / sum of weights)."""

    acceptance_threshold: float = 0.8
    score_reward: Optional[str] = None


@dataclass
class GenerativeEvalBlock(ScoringBlock):
    """Held-out generation (stagewise.evaluation.EvalSpec): the eval stage, and SFT (with reward=) / GRPO in-loop."""

    pass_k: List[int] = field(default_factory=lambda: [1])
    # completions per prompt; 0 = 1 greedy completion when pass_k == [1], else max(pass_k) sampled
    eval_num_samples: int = 0
    num_eval_prompts: int = 0  # 0 = all


@dataclass
class PeriodicEvalBlock(GenerativeEvalBlock):
    """Evals inside a training stage: at the start and the end whenever there are held-out prompts, plus these."""

    eval_steps: int = 0  # 0 = no periodic eval


@dataclass
class EarlyStoppingBlock:
    """Stop on a held-out metric (stagewise.training.early_stopping); final/ is then the best model."""

    early_stopping_metric: Optional[str] = None  # e.g. eval/loss, eval/accuracy; None = off
    early_stopping_patience: int = 0  # evals in a row without improvement before stopping; 0 = never stop
    early_stopping_mode: str = "auto"  # auto (min for a metric whose name contains "loss", else max) | min | max
    early_stopping_min_delta: float = 0.0


@dataclass
class TrainingStageBase(EarlyStoppingBlock, CheckpointBlock, PeriodicEvalBlock, ScheduleBlock, OptimiserBlock,
                        StageBase):
    """The blocks every stage that updates weights with an optimiser has (sft, grpo)."""


@dataclass
class VocabStage(StageBase):
    """DeepAnalyze stage 0 (stagewise.stages.vocab): add tags as single tokens, initialise their embeddings."""

    name: str = "vocab"
    new_tokens: List[str] = field(default_factory=lambda: list(DEEPANALYZE_TAGS))
    init: str = "subtoken_mean"  # subtoken_mean | random


@dataclass
class SFTStage(TrainingStageBase):
    """Supervised fine-tuning (stagewise.stages.sft). An optimizer step is ``hardware.per_device_batch_size`` x
    ``hardware.grad_accum_steps`` rows per process."""

    name: str = "sft"


@dataclass
class GRPOStage(TrainingStageBase):
    """Policy-gradient RL (stagewise.stages.grpo). One step = ``prompts_per_step`` prompts x ``rollout.n`` samples;
    an optimizer step is one mini-batch of ``mini_batch_size`` of those prompts (``hardware.grad_accum_steps`` is
    not used: the micro-batches of ``hardware.per_device_batch_size`` sequences follow from the mini-batch)."""

    name: str = "grpo"
    prompts_per_step: int = 16
    mini_batch_size: int = 0  # prompts per optimizer step inside one rollout batch; 0 = all (on-policy)
    ppo_epochs: int = 1
    samples_steps: int = 1  # write samples/step_<N>.parquet every N steps; 0 = never


@dataclass
class RejectionSamplingStage(ScoringBlock, StageBase):
    """DeepSeek-R1's rejection sampling (stagewise.stages.rejection_sampling): sample, score, keep, mix, write."""

    name: str = "rejection_sampling"
    best_per_prompt: bool = False
    # keep completions cut at rollout.max_new_tokens (default: rejected, they never finish)
    keep_truncated: bool = False
    # general (non-reasoning) SFT data mixed in so that it makes up general_data_ratio of the output
    # (R1: 200k general next to 600k reasoning = 0.25)
    general_data_ratio: float = 0.0
    general_sources: List[SourceConfig] = field(default_factory=list)


@dataclass
class EvalStage(GenerativeEvalBlock, StageBase):
    """Held-out evaluation of any checkpoint (stagewise.stages.eval): mean reward, accuracy, pass@k."""

    name: str = "eval"


STAGE_SCHEMAS: Dict[str, type] = {"vocab": VocabStage, "sft": SFTStage, "grpo": GRPOStage,
                                  "rejection_sampling": RejectionSamplingStage, "eval": EvalStage}


# ----------------------------------------------------------------------------------------------- algorithm
@dataclass
class AlgorithmBase:
    """What every objective has: its name. Registered as `algorithm/base_sft` / `algorithm/base_policy_gradient`."""

    name: str = "sft"  # sft | grpo | dr_grpo | dapo | gspo


@dataclass
class SFTAlgorithm(AlgorithmBase):
    """Token cross-entropy on trained tokens (stagewise.algorithms.sft_loss): nothing to set."""

    name: str = "sft"


@dataclass
class PolicyGradientAlgorithm(AlgorithmBase):
    """A GRPO-family objective; each conf/algorithm/<variant>.yaml sets every field."""

    name: str = "grpo"  # grpo | dr_grpo | dapo | gspo
    # advantages
    adv_scale: str = "group"  # group | batch | none
    # policy ratio and clipping
    ratio_level: str = "token"  # token (GRPO) | sequence (GSPO)
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    dual_clip_c: Optional[float] = None  # e.g. 3.0; None disables dual clip
    loss_agg: str = "seq_mean_token_mean"  # token_mean | seq_mean_token_mean | seq_mean_token_sum_norm
    loss_agg_max_tokens: Optional[int] = None  # Dr. GRPO constant; defaults to rollout.max_new_tokens
    # KL to a reference (off by default, as in DeepAnalyze)
    beta: float = 0.0
    kl_estimator: str = "k3"  # k1 | k2 | k3
    # sampling filters
    filter_zero_std_groups: bool = False
    max_resample_rounds: int = 0  # dynamic sampling: extra generation rounds to refill filtered groups
    mask_truncated: bool = False
    # vLLM/trainer mismatch correction (truncated importance sampling)
    tis_cap: Optional[float] = 2.0
    entropy_coef: float = 0.0


ALGORITHM_SCHEMAS: Dict[str, type] = {"sft": SFTAlgorithm, "grpo": PolicyGradientAlgorithm,
                                      "dr_grpo": PolicyGradientAlgorithm, "dapo": PolicyGradientAlgorithm,
                                      "gspo": PolicyGradientAlgorithm}


# ------------------------------------------------------------------------------------------------ hardware
@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0  # 0 = off, 2, 3
    offload_optimizer: bool = False
    offload_params: bool = False
    zero3_save_16bit_model: bool = True


@dataclass
class HardwareConfig:
    num_processes: int = 1
    num_machines: int = 1
    mixed_precision: str = "no"  # no | bf16 | fp16
    per_device_batch_size: int = 4
    grad_accum_steps: int = 1
    gradient_checkpointing: bool = False
    use_liger: bool = False  # only takes effect when liger-kernel is installed and a GPU is present
    cpu: bool = False  # force CPU even when a GPU is present
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logprob_chunk_size: int = 1024  # tokens per chunk when computing log-probs without full-vocab logits
    # > 0: micro-batches of at most this many tokens instead of per_device_batch_size rows (a longer sequence goes
    # alone). GRPO: each packed into one unpadded row of prompt + completion tokens (restarting position_ids, no pad
    # token through any layer; 0 = padded rows). SFT: out of the rank's per_device_batch_size x grad_accum_steps
    # rows of the step (the step, its loss and normaliser unchanged; only the number of forwards varies)
    max_tokens_per_micro_batch: int = 0


# ------------------------------------------------------------------------------------------------- reward
@dataclass
class RewardFnConfig:
    """One reward: a registered name or ``my_pkg.mod:fn`` / ``path/to/file.py:fn``."""

    name: str = MISSING
    weight: float = 1.0
    params: Dict[str, Any] = field(default_factory=dict)
    alias: Optional[str] = None  # the name in logs; needed when the same function appears twice


@dataclass
class RewardConfig:
    functions: List[RewardFnConfig] = field(default_factory=list)
    timeout_s: float = 10.0  # per call of a slow reward (sympy, judge)
    num_workers: int = 4
    allow_missing_columns: bool = False  # a reward's required column missing from the data: warn, don't stop
    max_failed_steps: int = 3  # a function failing on every sample of this many batches in a row stops the stage


# ---------------------------------------------------------------------------------------------------- env
@dataclass
class EnvConfig:
    name: str = "single_turn"  # single_turn | code_sandbox
    max_turns: int = 1
    max_context_tokens: int = 32768
    workspace_root: Optional[str] = None
    timeout_s: float = 10.0
    memory_mb: int = 2048
    stateful: bool = False
    max_output_chars: int = 8192
    num_workers: int = 8
    isolation: str = "auto"  # auto (first that works) | bwrap | namespaces (unshare + rlimits) | none
    max_processes: int = 64
    max_file_mb: int = 256


# ------------------------------------------------------------------------------------------------ rollout
@dataclass
class RolloutConfig:
    backend: str = "hf"  # hf | vllm | vllm_server
    n: int = 8  # samples per prompt (GRPO group size)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 256
    stop: List[str] = field(default_factory=list)
    batch_size: int = 64  # sequences per generate() call for the hf backend
    # vLLM
    gpu_memory_utilization: float = 0.5
    enable_sleep_mode: bool = True  # GPU only: vLLM's CPU backend has no sleep mode, the engine stays resident
    cpu_kv_cache_gb: float = 1.0  # CPU engine: memory for its KV cache (GiB, per engine); a GPU sizes it by utilization
    server_url: Optional[str] = None
    # vllm_server full-weight sync: the address the server reaches this machine at (None: this host's name, or
    # 127.0.0.1 for a server on 127.0.0.1); stagewise.rollout.weight_sync
    weight_sync_host: Optional[str] = None
    tensor_parallel_size: int = 1
    lora_sync: str = "merged"  # merged (merge LoRA into the engine's weights) | adapter (vLLM LoRA request)


# ------------------------------------------------------------------------------------------------- logger
@dataclass
class AlertsConfig:
    """Trend-alert thresholds (stagewise.tracking.alerts.TrendAlerts); an alert is logged as ``alert/<name>``."""

    reward_falling_logs: int = 5  # consecutive decreases of a reward/<fn>/mean
    entropy_collapse_fraction: float = 0.1  # of the first logged entropy
    kl_max: float = 1.0  # nats per token; far above any healthy GRPO run (0.001-0.1)
    kl_spike_factor: float = 10.0  # x the median of the previous `window` logs
    grad_spike_factor: float = 10.0  # x the median of the previous `window` logs
    window: int = 20  # logs kept for the spike medians
    min_history: int = 5  # earlier logs needed before a spike can be judged


@dataclass
class LoggerConfig:
    sinks: List[str] = field(default_factory=lambda: ["console", "jsonl"])  # + wandb, tensorboard
    project: str = "stagewise"
    wandb_mode: Optional[str] = None  # online | offline | disabled; None: W&B decides ($WANDB_MODE, else online)
    wandb_entity: Optional[str] = None
    progress_bar: bool = True
    alerts: AlertsConfig = field(default_factory=AlertsConfig)


# -------------------------------------------------------------------------------------------------- paths
@dataclass
class PathsConfig:
    root_dir: str = "."
    output_dir: str = "outputs"
    cache_dir: str = "${paths.output_dir}/.cache"
    data_dir: str = "data"


# ------------------------------------------------------------------------------------------------ cluster
@dataclass
class ClusterConfig:
    """Read only by the SLURM launcher presets; set it in the gitignored ``conf/local/default.yaml``."""

    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    timeout_min: int = 240
    gpus_per_node: int = 8
    cpus_per_task: int = 8
    mem_gb: Optional[int] = None
    max_requeues: int = 10
    setup: List[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- pipeline
@dataclass
class PipelineStageConfig:
    name: str = MISSING
    overrides: List[str] = field(default_factory=list)


@dataclass
class PipelineConfig:
    name: Optional[str] = None  # None = run the single stage given by `stage=`
    stages: List[PipelineStageConfig] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ top level
@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # The chosen stage's / objective's schema (one of STAGE_SCHEMAS / ALGORITHM_SCHEMAS) replaces these bases when
    # its YAML is composed; a subclass merged into a base-typed node keeps the subclass's fields.
    stage: StageBase = field(default_factory=StageBase)
    algorithm: AlgorithmBase = field(default_factory=AlgorithmBase)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    task_name: str = "train"
    # One id for every rank of a run (see stagewise.run_folder.run_id); the run folder is
    # ${paths.output_dir}/${task_name}/${run_id}. Set it to reuse a folder, e.g. to resume.
    run_id: str = "${stagewise_run_id:}"
    run_dir: Optional[str] = None  # filled in by train.py from Hydra's output dir
    seed: int = 0
    # auto (latest checkpoint in run_dir, if any) | never (refuses a folder holding a run) | overwrite (deletes it
    # first) | <checkpoint path>
    resume: str = "auto"
    tags: List[str] = field(default_factory=list)


def _unstrict(schema: type):
    """``schema`` as a node whose struct flag is off. Merged into ``stage`` / ``algorithm``, the flag carries over,
    so a key the chosen schema lacks survives composition and reaches `validate_config`, whose error names the key,
    the stage and where the key does belong; OmegaConf's own would only say ``Key 'x' not in 'SFTStage'`` (and a
    ``+stage.x`` override would pass it). Declared fields keep their types: a bad value still fails at compose."""
    from omegaconf import OmegaConf

    node = OmegaConf.structured(schema)
    OmegaConf.set_struct(node, False)
    return node


def _unstrict_tree(schema: type):
    """`_unstrict` for ``schema`` and every dataclass node below it: Hydra sets the struct flag on the composed
    root, but a node's own ``False`` wins, so ``hardware.num_proceses=2`` (no ``+``) reaches `validate_config` too
    instead of stopping in OmegaConf with ``Key 'num_proceses' not in 'HardwareConfig'``."""
    from omegaconf import DictConfig, OmegaConf

    node = OmegaConf.structured(schema)

    def unset(n) -> None:
        if isinstance(n, DictConfig) and OmegaConf.get_type(n) not in (None, dict):
            OmegaConf.set_struct(n, False)
            for key in n.keys():
                unset(n._get_node(key))

    unset(node)
    return node


def register_configs() -> None:
    """``train_schema`` (the whole tree) plus one schema per stage and objective: ``stage/base_<name>`` and
    ``algorithm/base_sft`` / ``algorithm/base_policy_gradient``, named by each YAML's defaults list."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=_unstrict_tree(TrainConfig))
    for name, schema in STAGE_SCHEMAS.items():
        cs.store(group="stage", name=f"base_{name}", node=_unstrict(schema))
    cs.store(group="algorithm", name="base_sft", node=_unstrict(SFTAlgorithm))
    cs.store(group="algorithm", name="base_policy_gradient", node=_unstrict(PolicyGradientAlgorithm))


class UnknownConfigKeyError(KeyError):
    """A key that the schema of its node does not declare (raised by `validate_config`)."""

    def __str__(self) -> str:  # KeyError's own str() wraps the message in quotes
        return str(self.args[0])


# Top-level nodes whose schema depends on their `name`.
_NAMED_SCHEMAS: Dict[str, Dict[str, type]] = {"stage": STAGE_SCHEMAS, "algorithm": ALGORITHM_SCHEMAS}


def _named_schema(group: str, node) -> type:
    """The schema of ``stage`` / ``algorithm``: the one its YAML composed in, or (for a config printed by
    ``--cfg job`` and fed back, which carries no types) the one its ``name`` selects. Raises when they disagree."""
    from omegaconf import OmegaConf

    registry = _NAMED_SCHEMAS[group]
    base = StageBase if group == "stage" else AlgorithmBase
    name = node.get("name", base.name)
    composed = OmegaConf.get_type(node)
    if name == "none" and group == "stage" and composed in (None, dict, StageBase):
        return StageBase  # no stage chosen: a pipeline run
    if name not in registry:
        raise ValueError(f"{group}.name={name!r} is not one of {', '.join(registry)}")
    if composed in registry.values() and composed is not registry[name]:
        raise ValueError(f"{group}.name={name!r} does not match the composed schema {composed.__name__} "
                         f"(which is {group}.name={composed.name!r}): choose the {group} with {group}={name}")
    return registry[name]


def _unknown_key_message(path: str, key: str, schema: type, fields, chosen: Optional[str] = None) -> str:
    """``unknown config key stage.prompts_per_step (not a field of SFTStage, the schema of stage=sft; it is a field
    of stage=grpo; valid keys: [...])``: where the key belongs, else the closest valid name. ``chosen``: the
    ``name`` of a ``stage`` / ``algorithm`` node."""
    import dataclasses
    import difflib

    where = schema.__name__
    group = path[:-1]
    hint = ""
    if group in _NAMED_SCHEMAS:
        registry = _NAMED_SCHEMAS[group]
        where += f", the schema of {group}={chosen}"
        owners = [n for n, s in registry.items() if s is not schema and key in {f.name for f in dataclasses.fields(s)}]
        if owners:
            hint = f"; it is a field of {group}={'|'.join(owners)}"
    if not hint:
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        if close:
            hint = f"; did you mean {path}{close[0]}?"
    if len(fields) <= _LISTED_FIELDS:
        listing = f"; valid keys: {sorted(fields)}"
    elif hint:
        listing = ""
    else:  # no close match among many fields: not the whole list
        listing = f"; no valid key is close, `python train.py --cfg job` shows all {len(fields)}"
    return f"unknown config key {path}{key!s} (not a field of {where}{hint}{listing})"


_LISTED_FIELDS = 8  # a node with at most this many fields lists them all in the unknown-key message


def validate_config(cfg) -> None:
    """Check a composed config against the schemas; raise naming the first unknown key.

    Needed on top of composition because (1) the ``stage`` and ``algorithm`` schemas are composed with their struct
    flag off (see `_unstrict`), (2) Hydra's ``+key=value`` appends with the struct flag lifted, so a misspelt
    ``+stage.learnin_rate`` would slip through, and (3) a config printed by ``--cfg job`` and fed back as the
    primary config carries no schema. ``stage`` and ``algorithm`` are checked against the schema their ``name``
    selects (`STAGE_SCHEMAS`, `ALGORITHM_SCHEMAS`). Types were already checked by OmegaConf on assignment. A
    top-level ``hydra`` node (``compose(..., return_hydra_config=True)``) is Hydra's own and is skipped.
    """
    import dataclasses
    import typing

    from omegaconf import DictConfig, ListConfig, OmegaConf

    def child_schema(schema: type, node, key: str):
        typed = OmegaConf.get_type(node, key)
        if dataclasses.is_dataclass(typed):
            return typed
        declared = typing.get_type_hints(schema).get(key)  # an untyped (printed) config: the declared field type
        return declared if isinstance(declared, type) and dataclasses.is_dataclass(declared) else None

    def walk(node, schema, path: str) -> None:
        if isinstance(node, DictConfig) and path[:-1] in _NAMED_SCHEMAS and path.count(".") == 1:
            schema = _named_schema(path[:-1], node)
        if isinstance(node, DictConfig) and dataclasses.is_dataclass(schema):
            fields = {f.name for f in dataclasses.fields(schema)}
            for key in node.keys():
                if key == "hydra" and not path:
                    continue
                if key not in fields:
                    raise UnknownConfigKeyError(_unknown_key_message(path, str(key), schema, fields, node.get("name")))
                walk(node._get_node(key), child_schema(schema, node, key), f"{path}{key}.")
        elif isinstance(node, ListConfig):
            for i, item in enumerate(node._iter_ex(resolve=False)):
                walk(item, OmegaConf.get_type(item) if isinstance(item, DictConfig) else None, f"{path[:-1]}[{i}].")

    walk(cfg, TrainConfig, "")


def typed_config(cfg) -> TrainConfig:
    """The composed config as objects: a `TrainConfig` whose ``stage`` and ``algorithm`` are the schemas their
    ``name`` selects (`SFTStage`, `PolicyGradientAlgorithm`, ...), every interpolation resolved. train.py hands this
    to the stage's ``run``, so stage code reads typed fields and a typo in a field name is an AttributeError at the
    first read, not a silent ``None``. Accepts a composed DictConfig or a config printed by ``--cfg job`` and fed back
    (no types: they come from the schemas); checks it with `validate_config` first. A `TrainConfig` is returned as is.
    """
    from omegaconf import OmegaConf

    if isinstance(cfg, TrainConfig):
        return cfg
    validate_config(cfg)
    chosen = {group: OmegaConf.structured(_named_schema(group, cfg[group])) for group in _NAMED_SCHEMAS}
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), chosen, cfg))  # type: ignore


def compose(overrides: List[str], config_dir: Optional[str] = None, typed: bool = True):
    """The config ``python train.py <overrides>`` would run, for scripts, benchmarks and notebooks: composed from
    ``config_dir`` (default: the repository's ``conf/``), checked (`validate_config`), as objects (`typed_config`)
    unless ``typed=False``. ``run_id`` resolves to a fresh id unless an override sets it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from stagewise.run_folder import register_resolvers

    register_resolvers()
    register_configs()
    GlobalHydra.instance().clear()
    conf = config_dir or str(Path(__file__).resolve().parents[2] / "conf")
    with initialize_config_dir(config_dir=os.path.abspath(conf), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=list(overrides))
    GlobalHydra.instance().clear()
    if not typed:
        validate_config(cfg)
        return cfg
    return typed_config(cfg)


def config_dict(cfg) -> Dict[str, Any]:
    """A plain, resolved dict of a config given as objects (`typed_config`) or as a DictConfig: what a logger
    (W&B's run config, TensorBoard's hparams) stores."""
    from omegaconf import OmegaConf

    node = cfg if OmegaConf.is_config(cfg) else OmegaConf.structured(cfg)
    return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]


# ------------------------------------------------------------------------------- checks before anything runs
try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover
    _HydraCallback = object


class ConfigValueError(ValueError):
    """A config value that cannot work (a stage without what it needs, a schema chosen as a stage): reported in one
    line like an unknown key."""


def config_error_exit(err: Exception) -> SystemExit:
    """The short exit for a config error: ``Error: <message>`` on stderr, exit code 1, no traceback."""
    return SystemExit(f"Error: {err}")


class ValidateConfig(_HydraCallback):  # type: ignore[misc, valid-type]
    """Hydra callback (``conf/hydra/default.yaml``): `validate_config` before Hydra creates the run folder, so an
    unknown key stops with the project's one-line message and leaves nothing behind. Hydra turns a callback's
    exception into a warning and goes on, hence the ``SystemExit``."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        self._check(config)

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self._check(config)  # the sweep's base config; each job's own overrides are checked by train.py's main

    @staticmethod
    def _check(config: Any) -> None:
        try:
            validate_config(config)
        except (UnknownConfigKeyError, ValueError) as e:
            raise config_error_exit(e) from None


def without_schema_options(help_text: str) -> str:
    """Hydra's ``--help`` lists every entry of a group, the stage and objective schemas (``base_*``, registered for
    the stage files' defaults lists) too; they are not choices."""
    return re.sub(r"\bbase_[a-z_]+, ", "", help_text)


def check_top_level_overrides(argv: List[str], conf_dir: str) -> None:
    """A plain ``key=value`` whose key is neither a top-level field of `TrainConfig` nor a config group (a folder of
    ``conf_dir``, or ``hydra``) stops with the project's one-line message. Hydra would reject it while composing,
    with its own ``Could not override 'foo'. To append to your config use +foo=1``, which suggests the wrong fix and
    never reaches `validate_config` (the composed root is struct). Dotted keys, ``+``/``~`` overrides and flags are
    left to composition and `validate_config`; so is everything when another config folder is given (its groups
    are not known here)."""
    import dataclasses
    import os

    if any(a.startswith(("--config-dir", "--config-path", "-cd", "-cp")) for a in argv):
        return
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    groups = {d for d in os.listdir(conf_dir) if os.path.isdir(os.path.join(conf_dir, d))} | {"hydra"}
    for arg in argv:
        if arg.startswith(("-", "+", "~")) or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        if key in ("stage", "algorithm") and value.startswith("base_"):
            choices = sorted(f[:-5] for f in os.listdir(os.path.join(conf_dir, key))
                             if f.endswith(".yaml") and not f.startswith("base_"))
            raise config_error_exit(ConfigValueError(
                f"{arg} is a schema the {key} files build on, not a {key}: choose one of {', '.join(choices)}"))
        if any(c in key for c in "./@") or key in fields or key in groups:
            continue
        raise config_error_exit(UnknownConfigKeyError(_unknown_key_message("", key, TrainConfig, fields, None)))


def validate_printed_config(argv: List[str], calling_file: str, config_path: str = "conf",
                            config_name: str = "train") -> None:
    """``python train.py ... --cfg job|hydra|all``: Hydra prints the config and exits before any callback or the
    task function runs, so an unknown key would be printed without complaint. Compose the config as Hydra is about
    to (same search path, ``--config-path``/``--config-dir``/``--config-name``, overrides) and validate it; raise the
    short `config_error_exit` on an unknown key. Anything else (not ``--cfg``, a compose error) is left to Hydra,
    which reports it itself."""
    from hydra._internal.utils import create_automatic_config_search_path, get_args_parser

    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit:  # Hydra will print its own usage error
        return
    if not args.cfg:
        return
    from hydra._internal.hydra import Hydra
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    search_path = create_automatic_config_search_path(calling_file, None, args.config_path or config_path)
    if args.config_dir is not None:
        search_path.prepend(provider="command-line", path=f"file://{os.path.abspath(args.config_dir)}",
                            anchor=SearchPathQuery(provider="schema"))
    try:
        hydra = Hydra.create_main_hydra2(task_name=Path(calling_file).stem, config_search_path=search_path)
        cfg = hydra.compose_config(config_name=args.config_name or config_name, overrides=args.overrides,
                                   run_mode=RunMode.RUN, with_log_configuration=False)
    except Exception:  # noqa: BLE001 - Hydra reports compose errors itself when it composes again
        return
    finally:
        GlobalHydra.instance().clear()
    try:
        validate_config(cfg)
    except (UnknownConfigKeyError, ValueError) as e:
        raise config_error_exit(e) from None


# Shared stage blocks in the order the README lists them (`schema_reference`).
_STAGE_BLOCKS = [("optimiser", OptimiserBlock), ("schedule", ScheduleBlock), ("checkpoints", CheckpointBlock),
                 ("scoring", ScoringBlock), ("generative eval", GenerativeEvalBlock),
                 ("periodic eval", PeriodicEvalBlock), ("early stopping", EarlyStoppingBlock)]


def schema_reference() -> str:
    """The README's per-stage and per-objective field tables, generated from the schemas (a test keeps the README
    equal to this; regenerate with ``python -m stagewise.config``)."""
    import dataclasses

    def names(cls) -> list:
        return [f.name for f in dataclasses.fields(cls)]

    lines = ["| `stage=` | schema | fields (besides `name`), by shared block |", "|---|---|---|"]
    for stage, schema in STAGE_SCHEMAS.items():
        seen = {"name"}
        parts = []
        for label, block in _STAGE_BLOCKS:
            if issubclass(schema, block):
                own = [n for n in names(block) if n not in seen]
                seen.update(own)
                parts.append(f"{label}: " + ", ".join(f"`{n}`" for n in own))
        own = [n for n in names(schema) if n not in seen]
        if own:
            parts.append(f"{stage}: " + ", ".join(f"`{n}`" for n in own))
        lines.append(f"| `{stage}` | `{schema.__name__}` | " + "; ".join(parts) + " |")
    lines += ["", "| `algorithm=` | schema | fields (besides `name`) |", "|---|---|---|"]
    for schema in dict.fromkeys(ALGORITHM_SCHEMAS.values()):
        choices = ", ".join(f"`{n}`" for n, s in ALGORITHM_SCHEMAS.items() if s is schema)
        fields = ", ".join(f"`{n}`" for n in names(schema) if n != "name") or "none"
        lines.append(f"| {choices} | `{schema.__name__}` | {fields} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(prog="python -m stagewise.config",
                            description="Print the README's schema tables (the fields of every stage= and algorithm= "
                                        "schema), generated from this module.").parse_args()
    print(schema_reference())
