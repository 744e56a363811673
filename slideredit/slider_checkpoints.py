"""Reading and writing SliderEdit adapter checkpoints.

Formats read:
- GSTLoRA as released: `pytorch_lora_weights.safetensors`, diffusers LoRA naming with the `transformer.`
  prefix: `transformer.transformer_blocks.{i}.attn.to_q.lora_A.weight` (r, d_in), `...lora_B.weight`
  (d_out, r); q, k and v are separate LoRAs that land on their row blocks of our fused projections.
- STLoRA as released: `selective_lora.pt`, a pickled dict with the same naming without the prefix (read
  with `weights_only=True`), and our safetensors form `selective_lora.safetensors` (same names).
- BFL-style names, e.g. `double_blocks.{i}.img_attn.qkv.lora_A.weight` with B over the fused q/k/v rows
  (`lora_down`/`lora_up` and `.alpha` scalars too, prefixes `diffusion_model.`/`transformer.`).

Writing uses the release's naming, so our checkpoints load in the release's code and back here.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from .atomic import atomic_path
from .checkpoint import CheckpointError
from .sliders import GSTLORA, STLORA, TARGETS, adapter_parameters, add_adapter, is_fused_qkv, part_rows
from .transformer import Flux

FILE_NAMES = {GSTLORA: ("pytorch_lora_weights.safetensors",),
              STLORA: ("selective_lora.safetensors", "selective_lora.pt")}
RELEASE_PREFIX = {GSTLORA: "transformer.", STLORA: ""}

# diffusers module (inside a block) -> (BFL module inside the block, LoRA part)
_DOUBLE_LORA_PARTS = {
    "attn.to_q": ("img_attn.qkv", "q"), "attn.to_k": ("img_attn.qkv", "k"), "attn.to_v": ("img_attn.qkv", "v"),
    "attn.to_out.0": ("img_attn.proj", "all"),
    "attn.add_q_proj": ("txt_attn.qkv", "q"), "attn.add_k_proj": ("txt_attn.qkv", "k"),
    "attn.add_v_proj": ("txt_attn.qkv", "v"), "attn.to_add_out": ("txt_attn.proj", "all"),
    "ff.net.0.proj": ("img_mlp.0", "all"), "ff.net.2": ("img_mlp.2", "all"),
    "ff_context.net.0.proj": ("txt_mlp.0", "all"), "ff_context.net.2": ("txt_mlp.2", "all"),
}
_SINGLE_LORA_PARTS = {"attn.to_q": ("linear1", "q"), "attn.to_k": ("linear1", "k"), "attn.to_v": ("linear1", "v")}
_TO_DIFFUSERS = {("double_blocks", v): ("transformer_blocks", k) for k, v in _DOUBLE_LORA_PARTS.items()}
_TO_DIFFUSERS |= {("single_blocks", v): ("single_transformer_blocks", k) for k, v in _SINGLE_LORA_PARTS.items()}

_DIFFUSERS_KEY = re.compile(r"(?:transformer\.|base_model\.model\.)?(transformer_blocks|single_transformer_blocks)"
                            r"\.(\d+)\.(.+)\.lora_([AB])(?:\.default)?\.weight")
_BFL_KEY = re.compile(r"(?:transformer\.|model\.diffusion_model\.|diffusion_model\.)?(double_blocks|single_blocks)"
                      r"\.(\d+)\.(.+?)\.(lora_A|lora_B|lora_down|lora_up|alpha)(?:\.weight)?")


def diffusers_name(module: str, part: str) -> str:
    """BFL module + part -> the release's module name, e.g. ("double_blocks.3.txt_attn.qkv", "k") ->
    "transformer_blocks.3.attn.add_k_proj"."""
    root, index, inner = module.split(".", 2)
    diff_root, diff_inner = _TO_DIFFUSERS[(root, (inner, part))]
    return f"{diff_root}.{index}.{diff_inner}"


# ---------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------

def find_adapter_file(path: str | os.PathLike, kind: str) -> Path:
    """The checkpoint file itself, or the release's file name inside a (checkpoint) folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        for name in FILE_NAMES[kind]:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: no {kind} checkpoint in this folder (looked for {', '.join(FILE_NAMES[kind])})")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such {kind} checkpoint file or folder")
    return path


def read_tensors(path: Path) -> dict[str, Tensor]:
    """A safetensors file, or a pickled tensor dict read with weights_only=True (never arbitrary code)."""
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read this adapter checkpoint ({type(err).__name__}: {err})") from None
    except Exception as err:  # the unpickler refuses non-tensor objects with various error types
        raise CheckpointError(f"{path}: not a plain tensor dict that loads with weights_only=True ({err})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    return dict(state)


def to_bfl_parts(tensors: dict[str, Tensor], path: Path) -> tuple[dict[str, dict[str, tuple[Tensor, Tensor]]], list[str]]:
    """Release or BFL naming -> ({bfl_module: {part: (A, B)}}, names of tensors that fit no rule)."""
    halves: dict[tuple[str, str], dict[str, Tensor]] = {}
    unknown = []
    for key, tensor in tensors.items():
        if m := _DIFFUSERS_KEY.fullmatch(key):
            root, index, inner, half = m.groups()
            table = _DOUBLE_LORA_PARTS if root == "transformer_blocks" else _SINGLE_LORA_PARTS
            if inner not in table:
                unknown.append(key)
                continue
            bfl_inner, part = table[inner]
            bfl_root = "double_blocks" if root == "transformer_blocks" else "single_blocks"
            halves.setdefault((f"{bfl_root}.{index}.{bfl_inner}", part), {})[half] = tensor
        elif m := _BFL_KEY.fullmatch(key):
            root, index, inner, half = m.groups()
            module = f"{root}.{index}.{inner}"
            half = {"lora_A": "A", "lora_down": "A", "lora_B": "B", "lora_up": "B"}.get(half, half)
            halves.setdefault((module, "qkv" if is_fused_qkv(module) else "all"), {})[half] = tensor
        else:
            unknown.append(key)

    weights: dict[str, dict[str, tuple[Tensor, Tensor]]] = {}
    for (module, part), pair in halves.items():
        if "A" not in pair or "B" not in pair:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise CheckpointError(f"{path}: {module} ({part}) has no {missing} tensor")
        a, b = pair["A"], pair["B"]
        if "alpha" in pair:  # kohya-style: the update is scaled by alpha / rank
            b = b * (float(pair["alpha"]) / a.shape[0])
        weights.setdefault(module, {})[part] = (a, b)
    return weights, unknown


def check_adapter(model: Flux, kind: str, weights: dict[str, dict[str, tuple[Tensor, Tensor]]], unknown: list[str],
                  path: Path, lora_rank: int | None) -> int:
    """Every target present with the right shapes, nothing else. -> the (largest) LoRA rank."""
    targets = TARGETS[kind](model)
    problems = []
    extra = [f"{m} ({p})" for m, parts in weights.items() for p in parts if m not in targets] + unknown
    if extra:
        problems.append(f"{len(extra)} unexpected tensor(s) for {kind}: {', '.join(extra[:8])}")
    missing = []
    hidden = model.params.hidden_size
    for module in targets:
        have = set(weights.get(module, {}))
        want = ({"q", "k", "v"} if have != {"qkv"} else {"qkv"}) if is_fused_qkv(module) else {"all"}
        missing += [f"{module}.lora_A/B" if p == "qkv" else f"{diffusers_name(module, p)}.lora_A/B"
                    for p in sorted(want - have)]
        extra_parts = have - want
        if extra_parts:
            problems.append(f"{module}: unexpected LoRA parts {sorted(extra_parts)}")
    if missing:
        problems.append(f"{len(missing)} missing LoRA(s): {', '.join(missing[:8])}" +
                        (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))

    ranks = {a.shape[0] for parts in weights.values() for a, _ in parts.values()}
    if lora_rank is not None and ranks and ranks != {lora_rank}:
        problems.append(f"lora_rank={lora_rank} was given but the tensors have rank {sorted(ranks)}")
    for module, parts in weights.items():
        if module not in targets:
            continue
        layer = model.get_submodule(module)
        for part, (a, b) in parts.items():
            start, end = part_rows(part, hidden, layer.out_features)
            if a.shape != (a.shape[0], layer.in_features) or b.shape != (end - start, a.shape[0]):
                problems.append(f"{module} ({part}): lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}; expected "
                                f"({a.shape[0]}, {layer.in_features}) and ({end - start}, {a.shape[0]})")
    if problems:
        raise CheckpointError(f"{kind} checkpoint {path} does not fit this transformer:\n  " + "\n  ".join(problems[:12]))
    return max(ranks)


def load_adapter(model: Flux, kind: str, path: str | os.PathLike, lora_rank: int | None = None) -> int:
    """Read, check and attach a GSTLoRA or STLoRA checkpoint; the adapter starts switched off. -> rank."""
    file = find_adapter_file(path, kind)
    weights, unknown = to_bfl_parts(read_tensors(file), file)
    rank = check_adapter(model, kind, weights, unknown, file, lora_rank)
    dtype = torch.float32  # adapters stay fp32 beside a bf16 model; the kernel casts for its GEMMs
    add_adapter(model, kind, {m: {p: (a.to(dtype), b.to(dtype)) for p, (a, b) in parts.items()}
                              for m, parts in weights.items()})
    return rank


# ---------------------------------------------------------------------------------------------------
# Writing (the release's naming)
# ---------------------------------------------------------------------------------------------------

def adapter_state_dict(model: Flux, kind: str, parameters: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The adapter's tensors under the release's names (fp32, contiguous, on the CPU). `parameters`: whole
    tensors standing in for adapter_parameters(model, kind) where the model holds shards of them (FSDP)."""
    out = {}
    for name, param in (adapter_parameters(model, kind) if parameters is None else parameters).items():
        module, part, half = name.rsplit(".", 2)
        out[f"{RELEASE_PREFIX[kind]}{diffusers_name(module, part)}.{half}.weight"] = \
            param.detach().float().contiguous().cpu()
    return out


def save_adapter(model: Flux, kind: str, folder: str | os.PathLike,
                 parameters: dict[str, Tensor] | None = None) -> Path:
    """Write `folder/pytorch_lora_weights.safetensors` (GSTLoRA) or `folder/selective_lora.safetensors`
    (STLoRA), atomically; `parameters` as in adapter_state_dict."""
    path = Path(folder) / FILE_NAMES[kind][0]
    with atomic_path(path) as tmp:
        save_file(adapter_state_dict(model, kind, parameters), tmp)
    return path
