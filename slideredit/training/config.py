"""The training configuration: one flat dataclass, read from the release's YAML, overridable from the CLI.

Field names are those of the SliderEdit release's YAML files (pretrained_model_name_or_path, ...,
resume_from_checkpoint), plus a few of ours (method, resolution, teacher_prompt, ...). Unknown fields
are an error that names them, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import difflib
import math
import os
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

GSTLORA, STLORA = "gstlora", "stlora"  # slideredit.sliders' method names, without importing torch from there
DDP, FSDP = "ddp", "fsdp"  # the `sharding` values (training.distributed)
NEUTRAL_PROMPT = "keep the image the same"


class ConfigError(ValueError):
    """A training configuration that cannot be used as written."""


@dataclass
class TrainConfig:
    # --- model and adapter -------------------------------------------------------------------------
    pretrained_model_name_or_path: str = "black-forest-labs/FLUX.1-Kontext-dev"
    method: str = GSTLORA  # "gstlora" (one global slider) or "stlora" (one slider per sub-instruction)
    lora_rank: int = 16
    lora_dropout: float = 0.0  # the release trains without dropout; only 0 is accepted
    # --- data: exactly one of dataset_name / images_dataset_path -------------------------------------
    dataset_name: str | None = None  # instruction-editing rows: a hub dataset, a folder, or a JSONL/CSV/parquet file
    image_column: str = "input_image"  # HQ-Edit's column names
    instruction_column: str = "edit"
    images_dataset_path: str | None = None  # a folder of images, edited by training_single_edit_prompts (PPS)
    training_single_edit_prompts: list[str] = field(default_factory=list)
    max_num_instructions_per_prompt: int = 3
    teacher_prompt: str = NEUTRAL_PROMPT  # GSTLoRA's teacher: the edit suppressed = "no edit"
    resolution: int = 1024  # shorter side resized to this, then a centre crop
    cache_dir: str | None = None  # cache VAE latents and prompt embeddings here (a fixed dataset)
    # --- optimisation (the release's values) --------------------------------------------------------
    learning_rate: float = 5e-5
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-4
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    train_batch_size: int = 6  # per process and micro-step
    gradient_accumulation_steps: int = 1
    max_train_steps: int = 1000  # optimizer steps
    guidance_scale: float = 3.5  # the distilled-guidance input, in training and validation
    mixed_precision: str = "bf16"  # "bf16": frozen model in bf16, adapters fp32; "no": everything fp32
    quantize: str | None = None  # "fp8": QLoRA-style, the frozen block linears in fp8 (mixed_precision the rest)
    gradient_checkpointing: bool = True
    sharding: str = DDP  # several processes: "ddp" (each holds the whole model) or "fsdp" (each holds 1/N of it)
    offload: bool = False  # keep the text encoders and the VAE on the CPU except while they encode
    seed: int = 0
    # --- outputs -------------------------------------------------------------------------------------
    output_dir: str = "slideredit-training"
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None  # keep only the newest K checkpoints
    resume_from_checkpoint: str | None = None  # "latest" or a checkpoint folder
    validation_prompts: list[str] = field(default_factory=list)
    validation_image: str | None = None  # default: the first training image
    validation_lora_scales: list[float] = field(default_factory=lambda: [-1.0, 0.0, 1.0])
    validation_steps: int = 100
    validation_num_inference_steps: int = 28
    logging_steps: int = 10  # loss/NaN checks and log lines; the only GPU syncs of the loop
    report_to: str = "none"  # "none" or "wandb"

    def __post_init__(self):
        for name, kind in field_types().items():  # YAML, CLI and Python values alike
            setattr(self, name, coerce(name, getattr(self, name), kind))
        check(self)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------
# Types: YAML and command-line values are coerced to the dataclass annotations
# ---------------------------------------------------------------------------------------------------

def field_types() -> dict[str, object]:
    return typing.get_type_hints(TrainConfig)


def _is_optional(kind) -> tuple[bool, object]:
    """`X | None` -> (True, X); anything else -> (False, kind)."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return True, args[0]
    return False, kind


def coerce(name: str, value, kind):
    """One field's value as its annotated type; a clear ConfigError otherwise. Strings are accepted
    for numbers because YAML reads `1e-4` (no dot) as a string and the CLI gives strings."""
    optional, kind = _is_optional(kind)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"config field {name!r} must not be empty (null)")
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        values = value if isinstance(value, (list, tuple)) else [value]
        return [coerce(f"{name}[{i}]", v, item) for i, v in enumerate(values)]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"config field {name!r} must be true or false, got {value!r}")
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"config field {name!r} must be a number, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"config field {name!r} must be a number, got {value!r}") from None
        if kind is int:
            if not number.is_integer():
                raise ConfigError(f"config field {name!r} must be a whole number, got {value!r}")
            return int(number)
        if not math.isfinite(number):  # YAML's .nan / .inf, or "nan" on the command line
            raise ConfigError(f"config field {name!r} must be a finite number, got {value!r}")
        return number
    if kind is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config field {name!r} must be a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {kind} for {name}")  # a bug in TrainConfig, not user input


def config_from_dict(values: dict, source: str = "config") -> TrainConfig:
    """Build and check a TrainConfig; unknown field names are an error naming the closest known one."""
    known = field_types()
    unknown = [k for k in values if k not in known]
    if unknown:
        hints = [f"{name!r}{did_you_mean(str(name), known)}" for name in unknown]
        raise ConfigError(f"{source}: unknown field(s) {', '.join(hints)}")
    return TrainConfig(**values)


def did_you_mean(name: str, known: typing.Iterable[str]) -> str:
    """The hint " (did you mean 'closest'?)" for a mistyped name, or "" when no known name is close."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def load_config(path: str | os.PathLike | None, overrides: dict | None = None) -> TrainConfig:
    """Read a flat YAML mapping of fields (may be None: defaults only), then apply `overrides`."""
    values = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of field: value, got {type(values).__name__}")
    return config_from_dict({**values, **(overrides or {})}, source=str(path or "config"))


# ---------------------------------------------------------------------------------------------------
# Checks that need more than a type
# ---------------------------------------------------------------------------------------------------

def check(c: TrainConfig) -> None:
    problems = []
    if c.method not in (GSTLORA, STLORA):
        problems.append(f"method must be {GSTLORA!r} or {STLORA!r}, got {c.method!r}")
    if c.lora_dropout != 0:
        problems.append(f"lora_dropout must be 0 (the release trains without dropout), got {c.lora_dropout}")
    if (c.dataset_name is None) == (c.images_dataset_path is None):
        problems.append("give exactly one of dataset_name (image + instruction rows) and images_dataset_path "
                        "(a folder of images with training_single_edit_prompts)")
    if c.images_dataset_path is not None and not c.training_single_edit_prompts:
        problems.append("images_dataset_path needs training_single_edit_prompts (the single edits to combine)")
    if any(not p.strip() for p in c.training_single_edit_prompts):
        problems.append("training_single_edit_prompts has an empty prompt")
    for name in ("lora_rank", "train_batch_size", "gradient_accumulation_steps", "max_train_steps",
                 "checkpointing_steps", "validation_steps", "validation_num_inference_steps", "logging_steps",
                 "max_num_instructions_per_prompt"):
        if getattr(c, name) < 1:
            problems.append(f"{name} must be at least 1, got {getattr(c, name)}")
    if c.checkpoints_total_limit is not None and c.checkpoints_total_limit < 1:
        problems.append(f"checkpoints_total_limit must be at least 1 (or null), got {c.checkpoints_total_limit}")
    if c.resolution < 16 or c.resolution % 16:
        problems.append(f"resolution must be a positive multiple of 16 (one latent token), got {c.resolution}")
    # (every float is finite already: coerce() rejects NaN and infinities)
    for name in ("learning_rate", "max_grad_norm", "adam_epsilon"):
        if getattr(c, name) <= 0:
            problems.append(f"{name} must be positive, got {getattr(c, name):g}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(c, name) < 1:
            problems.append(f"{name} must be in [0, 1), got {getattr(c, name):g}")
    for name in ("adam_weight_decay", "guidance_scale"):
        if getattr(c, name) < 0:
            problems.append(f"{name} must be at least 0, got {getattr(c, name):g}")
    if not 0 <= c.seed < 2 ** 32:  # numpy's global generator takes 32-bit seeds
        problems.append(f"seed must be in [0, 2**32), got {c.seed}")
    if c.mixed_precision not in ("no", "bf16"):
        problems.append(f"mixed_precision must be 'no' or 'bf16', got {c.mixed_precision!r}")
    if c.quantize not in (None, "fp8"):
        problems.append(f"quantize must be 'fp8' or null (no quantization), got {c.quantize!r}")
    if c.sharding not in (DDP, FSDP):
        hint = did_you_mean(c.sharding.lower(), (DDP, FSDP))
        problems.append(f"sharding must be {DDP!r} or {FSDP!r}, got {c.sharding!r}{hint}")
    if c.report_to not in ("none", "wandb"):
        problems.append(f"report_to must be 'none' or 'wandb', got {c.report_to!r}")
    if c.validation_prompts and not c.validation_lora_scales:
        problems.append("validation_prompts need validation_lora_scales (e.g. [-1, 0, 1])")
    if problems:
        raise ConfigError("invalid training config:\n  " + "\n  ".join(problems))
