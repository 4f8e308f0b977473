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

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Type, TypeVar

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
    # asynchronous GRPO: the next batches are generated while this one trains, on weights at most this many steps
    # old (0 = synchronous); generation runs in its own process with generator_threads torch threads
    max_staleness: int = 0
    generator_threads: int = 1


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


_Stage = TypeVar("_Stage", bound="StageBase")


def stage_as(cfg: "TrainConfig", schema: Type[_Stage]) -> _Stage:
    """``cfg.stage`` as the stage's own schema, which `stagewise.hydra_config.typed_config` built: each stage's
    ``run`` starts with ``st = stage_as(cfg, SFTStage)``, so its fields are visible to a type checker (the
    ``TrainConfig.stage`` field is typed as the `StageBase` every stage shares)."""
    if not isinstance(cfg.stage, schema):
        raise TypeError(f"stage {cfg.stage.name!r} has schema {type(cfg.stage).__name__}, not {schema.__name__}")
    return cfg.stage


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
