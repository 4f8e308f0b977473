"""DeepSpeed JSON from our config: pick a template from ``launchers/deepspeed/`` and fill its "auto" values.

    zero2.json  zero2_offload.json  zero3.json  zero3_offload.json

The templates hold what is tuned once per cluster (bucket sizes, overlap, pinning); everything that a Hydra
override can change comes from the config, so there is one source of truth:

    train_micro_batch_size_per_gpu   hardware.per_device_batch_size
    gradient_accumulation_steps      hardware.grad_accum_steps
    train_batch_size                 world size x per_device_batch_size x grad_accum_steps
    gradient_clipping                stage.max_grad_norm (0 = off)
    bf16.enabled / fp16.enabled      hardware.mixed_precision (after the CPU downgrade to "no", if any)
    zero_optimization.stage          hardware.deepspeed.zero_stage
    ...offload_optimizer.device      hardware.deepspeed.offload_optimizer ("cpu" | "none")
    ...offload_param.device          hardware.deepspeed.offload_params ("cpu" | "none")
    ...stage3_gather_16bit_weights_on_model_save   hardware.deepspeed.zero3_save_16bit_model
    reduce_bucket_size, stage3_prefetch_bucket_size, stage3_param_persistence_threshold
                                     from the model's hidden size (h^2, 0.9 h^2, 10 h) when given; else left
                                     "auto" for Accelerate, which fills exactly these three at ``prepare()``

Rules (HF Trainer's, made strict): an "auto" is filled; a concrete value that disagrees with the config is an
error naming the JSON key, the config key and both values (the Trainer only checks some keys and silently lets
the JSON win for others); a key the config decides but the JSON leaves out is added (a JSON without
``gradient_clipping`` would otherwise turn clipping off behind ``stage.max_grad_norm``'s back). Any other "auto"
left over is an error. Templates carry no ``optimizer``/``scheduler`` block: the loops build AdamW and the schedule
themselves, and the offload templates set ``zero_force_ds_cpu_optimizer: false`` so that this torch AdamW may run
on the offloaded (CPU) states (DeepSpeedCPUAdam is faster there, but needs a compiled extension).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

TEMPLATE_DIR = Path(__file__).resolve().parents[3] / "launchers" / "deepspeed"
HIDDEN_SIZE_KEYS = (
    "zero_optimization.reduce_bucket_size",
    "zero_optimization.stage3_prefetch_bucket_size",
    "zero_optimization.stage3_param_persistence_threshold",
)
ADD, SKIP = "add", "skip"


@dataclass(frozen=True)
class Value:
    """One config-derived value for a dotted DeepSpeed key. ``absent``: what to do when the JSON lacks the key:
    ``ADD`` it, ``SKIP`` it, or any other value = DeepSpeed's own default (add only when ours differs from it)."""

    value: Any
    source: str
    absent: Any = ADD


def template_path(zero_stage: int, offload_optimizer: bool = False, offload_params: bool = False) -> Path:
    if zero_stage not in (2, 3):
        raise ValueError(f"hardware.deepspeed.zero_stage={zero_stage}: DeepSpeed templates exist for 2 and 3 "
                         f"(0 means no DeepSpeed)")
    if offload_params and zero_stage != 3:
        raise ValueError("hardware.deepspeed.offload_params=true needs hardware.deepspeed.zero_stage=3 "
                         "(ZeRO-2 shards optimizer states and gradients, not parameters)")
    name = f"zero{zero_stage}{'_offload' if offload_optimizer or offload_params else ''}.json"
    path = TEMPLATE_DIR / name
    if not path.exists():
        raise FileNotFoundError(f"DeepSpeed template {path} not found (templates ship in the source checkout's "
                                f"launchers/deepspeed/)")
    return path


def load_template(path: str | Path) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"DeepSpeed config {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"DeepSpeed config {path} is not valid JSON: {e}") from None


def config_values(cfg, *, world_size: int, mixed_precision: Optional[str] = None,
                  hidden_size: Optional[int] = None) -> Dict[str, Value]:
    """The DeepSpeed keys our config decides. ``mixed_precision`` overrides ``hardware.mixed_precision`` (the
    accelerator downgrades it to "no" on CPU)."""
    hw, ds = cfg.hardware, cfg.hardware.deepspeed
    mp = hw.mixed_precision if mixed_precision is None else mixed_precision
    micro, accum = int(hw.per_device_batch_size), int(hw.grad_accum_steps)
    clip = float(cfg.stage.max_grad_norm) if cfg.stage.max_grad_norm > 0 else 0.0
    values = {
        "train_micro_batch_size_per_gpu": Value(micro, "hardware.per_device_batch_size"),
        "gradient_accumulation_steps": Value(accum, "hardware.grad_accum_steps"),
        "train_batch_size": Value(world_size * micro * accum,
                                  f"world size {world_size} x per_device_batch_size x grad_accum_steps"),
        "gradient_clipping": Value(clip, "stage.max_grad_norm", absent=0.0),
        "bf16.enabled": Value(mp == "bf16", "hardware.mixed_precision", absent=False),
        "fp16.enabled": Value(mp == "fp16", "hardware.mixed_precision", absent=False),
        "zero_optimization.stage": Value(int(ds.zero_stage), "hardware.deepspeed.zero_stage"),
        "zero_optimization.offload_optimizer.device": Value("cpu" if ds.offload_optimizer else "none",
                                                            "hardware.deepspeed.offload_optimizer", absent="none"),
        "zero_optimization.offload_param.device": Value("cpu" if ds.offload_params else "none",
                                                        "hardware.deepspeed.offload_params", absent="none"),
        "zero_optimization.stage3_gather_16bit_weights_on_model_save": Value(
            bool(ds.zero3_save_16bit_model), "hardware.deepspeed.zero3_save_16bit_model", absent=SKIP),
    }
    if hidden_size:
        h = int(hidden_size)
        for key, v in zip(HIDDEN_SIZE_KEYS, (h * h, int(0.9 * h * h), 10 * h)):
            values[key] = Value(v, f"model hidden size {h}", absent=SKIP)
    return values


def _get(tree: Mapping, dotted: str, missing=None):
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return missing
        node = node[part]
    return node


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def _autos(tree: Any, prefix: str = "") -> list[str]:
    if isinstance(tree, Mapping):
        return [k for key, v in tree.items() for k in _autos(v, f"{prefix}{key}.")]
    return [prefix[:-1]] if tree == "auto" else []


def fill(template: Mapping, values: Mapping[str, Value], *, name: str = "DeepSpeed config",
         allow_auto: tuple[str, ...] = HIDDEN_SIZE_KEYS) -> dict:
    """A filled copy of ``template`` (pure). Raises ValueError listing every concrete value that disagrees with
    the config, and every "auto" that nothing fills (except the ``allow_auto`` keys, which Accelerate fills)."""
    out = copy.deepcopy(dict(template))
    missing = object()
    mismatches = []
    for key, v in values.items():
        current = _get(out, key, missing)
        if current is missing:
            if v.absent == SKIP or (v.absent != ADD and v.value == v.absent):
                continue
            _set(out, key, v.value)
        elif current == "auto":
            _set(out, key, v.value)
        elif current != v.value:
            mismatches.append(f"  {key}={current!r} in {name}, but {v.source} gives {v.value!r}")
    if mismatches:
        raise ValueError(f"{name} disagrees with the config (set these keys to \"auto\" in the JSON, or change the "
                         f"config):\n" + "\n".join(mismatches))
    left = [k for k in _autos(out) if k not in allow_auto]
    if left:
        raise ValueError(f"{name}: nothing fills \"auto\" for {left}; give them values in the JSON")
    return out


def build_deepspeed_config(cfg, *, world_size: int, mixed_precision: Optional[str] = None,
                           hidden_size: Optional[int] = None, template: str | Path | Mapping | None = None) -> dict:
    """The DeepSpeed dict for ``accelerate.utils.DeepSpeedPlugin(hf_ds_config=...)``.

    ``template``: a path or a dict; by default ``hardware.deepspeed.config_file`` when the config has that key
    and it is set, else the shipped template for ``zero_stage`` and the offload flags."""
    ds = cfg.hardware.deepspeed
    if template is None:
        template = getattr(ds, "config_file", None) or template_path(ds.zero_stage, ds.offload_optimizer,
                                                                     ds.offload_params)
    if isinstance(template, Mapping):
        tree, name = template, "DeepSpeed config"
    else:
        tree, name = load_template(template), str(template)
    values = config_values(cfg, world_size=world_size, mixed_precision=mixed_precision, hidden_size=hidden_size)
    return fill(tree, values, name=name)
