r"""Export a GSTLoRA for the tools people already run, and import it back.

    python -m slideredit.export runs/gst/checkpoint-400 --out exported/
    python -m slideredit.export runs/gst/checkpoint-400 --out exported/ --format comfyui
    python -m slideredit.export --from-comfyui exported/gstlora_comfyui.safetensors --out back/

writes, from any GSTLoRA file or folder `load_gstlora` reads (the release's names or BFL-style names):
- (a) `pytorch_lora_weights.safetensors`: diffusers/PEFT LoRA names with the `transformer.` prefix, as
  the release ships it: `transformer.transformer_blocks.0.attn.to_q.lora_A.weight` (r, d_in) and
  `.lora_B.weight` (d_out, r); q, k and v are separate LoRAs. diffusers'
  `FluxKontextPipeline.load_lora_weights` + `set_adapters([name], [alpha])` loads it.
- (b) `gstlora_comfyui.safetensors`: kohya names, which ComfyUI's LoRA loader maps onto FLUX's fused BFL
  weights: `lora_unet_<BFL module, dots as underscores>.lora_down.weight` (r', d_in), `.lora_up.weight`
  (d_out, r') and `.alpha` = r' (the update is scaled by alpha / r' = 1). A fused projection (`qkv`, the
  single blocks' `linear1`) takes one LoRA: lora_down = [A_q; A_k; A_v] and lora_up block-diagonal, so
  up @ down = [B_q A_q; B_k A_k; B_v A_v] exactly; linear1's MLP rows get zero rows of lora_up (ComfyUI
  adds up @ down to the whole weight). ComfyUI merges the update into the weight, so the rank 3r adds no
  per-token compute there. diffusers reads this file too, exactly, but its kohya converter splits linear1 into q, k, v
  and the MLP (`proj_mlp`), each keeping the whole rank-3r lora_down (the MLP's all zero): in diffusers,
  load (a). `--from-comfyui` reads this file, kohya files other tools write, and ComfyUI files in the
  release's names (ComfyUI maps those onto row slices of the fused weights).

Sign convention. Both tools add strength * (B A) to the weight: W' = W + s * B A, exactly our
slider's y = W x + alpha * B (A x) on every token. So a ComfyUI LoRA strength (strength_model) s, or a
diffusers adapter weight s, is our slider alpha s: 1 suppresses the instruction, 0 is the base edit,
negative values exaggerate it. (Most LoRAs make "1 = more"; this one makes "1 = less".)

STLoRA cannot be exported: its slider scales only the T5 tokens of one sub-prompt, a per-token mask
computed from the prompt inside every adapted layer. A LoRA file in these tools applies one scale to
every token of the layer, so an STLoRA there would act on the whole text stream (all sub-prompts, the
joiners and the padding), which it was never trained for.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from .atomic import atomic_path
from .checkpoint import CheckpointError
from .slider_checkpoints import FILE_NAMES, RELEASE_PREFIX, diffusers_name, read_tensors, to_bfl_parts
from .sliders import GSTLORA, STLORA, is_fused_qkv

DIFFUSERS_FILE = FILE_NAMES[GSTLORA][0]  # pytorch_lora_weights.safetensors
COMFYUI_FILE = "gstlora_comfyui.safetensors"
KOHYA_PREFIX = "lora_unet_"
STLORA_REFUSAL = (
    "{path} is an STLoRA, which has no equivalent in diffusers/PEFT or ComfyUI LoRA files: its slider scales only "
    "the T5 tokens of one sub-prompt (a per-token mask built from the prompt inside every layer), while a LoRA file "
    "there applies one scale to every token. Export a GSTLoRA instead (one slider for the whole edit).")

Parts = dict[str, dict[str, tuple[Tensor, Tensor]]]  # BFL module -> {"q" | "k" | "v" | "all": (A, B)}


class ExportError(ValueError):
    """A checkpoint that cannot be exported or imported, with the reason."""


# ---------------------------------------------------------------------------------------------------
# Reading a GSTLoRA
# ---------------------------------------------------------------------------------------------------

def _split_fused(module: str, a: Tensor, b: Tensor, where: str | Path) -> dict[str, tuple[Tensor, Tensor]]:
    """A fused q/k/v LoRA (A (rank, hidden), B (rows, rank)) as q, k and v LoRAs: exactly rank-r ones when B
    is block-diagonal (A = [A_q; A_k; A_v], B_q, B_k, B_v on the diagonal), else each keeps the whole A
    (rank 3r, still exact). Rows past q, k, v (linear1's MLP) must be zero: a GSTLoRA does not adapt them."""
    hidden = a.shape[1]  # the fused projections take the hidden state: d_in = hidden
    if b[3 * hidden:].any():
        raise ExportError(f"{where}: {module} adapts the rows past q, k, v (linear1's MLP); a GSTLoRA does not")
    rank = a.shape[0]
    r = rank // 3
    diagonal = rank % 3 == 0 and all(
        not b[i * hidden:(i + 1) * hidden, j * r:(j + 1) * r].any() for i in range(3) for j in range(3) if i != j)
    return {p: (a[i * r:(i + 1) * r], b[i * hidden:(i + 1) * hidden, i * r:(i + 1) * r]) if diagonal
            else (a, b[i * hidden:(i + 1) * hidden]) for i, p in enumerate("qkv")}


def _split_qkv(weights: Parts, where: Path) -> Parts:
    """BFL-style names: each fused "qkv" LoRA as q, k and v LoRAs (_split_fused)."""
    out: Parts = {}
    for module, parts in weights.items():
        out[module] = {}
        for part, (a, b) in parts.items():
            out[module] |= _split_fused(module, a, b, where) if part == "qkv" else {part: (a, b)}
    return out


def read_gstlora(path: str | Path) -> Parts:
    """A GSTLoRA file, or a folder holding the release's file, as {BFL module: {part: (A, B)}}.

    kohya-style alpha scalars are folded into B. An STLoRA is refused with the reason (STLORA_REFUSAL).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        if not (path / DIFFUSERS_FILE).is_file():
            if any((path / name).is_file() for name in FILE_NAMES[STLORA]):
                raise ExportError(STLORA_REFUSAL.format(path=path))
            raise ExportError(f"{path}: no GSTLoRA in this folder (looked for {DIFFUSERS_FILE})")
        path = path / DIFFUSERS_FILE
    if not path.is_file():
        raise ExportError(f"{path}: no such GSTLoRA file or folder")
    if path.name in FILE_NAMES[STLORA]:
        raise ExportError(STLORA_REFUSAL.format(path=path))
    weights, unknown = to_bfl_parts(read_tensors(path), path)
    if unknown:
        raise ExportError(f"{path}: {len(unknown)} tensor(s) that are not SliderEdit LoRA weights: {unknown[:4]}")
    if not weights:
        raise ExportError(f"{path}: no LoRA tensors")
    if all(module.startswith("double_blocks.") and ".txt_" in module for module in weights):
        raise ExportError(STLORA_REFUSAL.format(path=path))  # only the text stream: an STLoRA under another name
    return _split_qkv(weights, path)


# ---------------------------------------------------------------------------------------------------
# (a) diffusers / PEFT and (b) kohya / ComfyUI
# ---------------------------------------------------------------------------------------------------

def diffusers_state_dict(weights: Parts) -> dict[str, Tensor]:
    """The release's names: transformer.<diffusers module>.lora_A.weight / .lora_B.weight."""
    out = {}
    for module, parts in weights.items():
        for part, (a, b) in parts.items():
            name = RELEASE_PREFIX[GSTLORA] + diffusers_name(module, part)
            # A copy each: q, k and v split from a fused LoRA share A, and safetensors refuses shared storage.
            out[f"{name}.lora_A.weight"] = a.float().clone(memory_format=torch.contiguous_format)
            out[f"{name}.lora_B.weight"] = b.float().clone(memory_format=torch.contiguous_format)
    return out


def _mlp_width(weights: Parts) -> int:
    """The FLUX MLP width, read from a double block's img_mlp.0 LoRA (its output rows): linear1 has
    3 * hidden + this many rows."""
    for module, parts in weights.items():
        if module.endswith("img_mlp.0") and "all" in parts:
            return parts["all"][1].shape[0]
    raise ExportError("cannot tell linear1's MLP width: the GSTLoRA has no img_mlp.0 LoRA")


def kohya_state_dict(weights: Parts) -> dict[str, Tensor]:
    """One LoRA per BFL weight: lora_unet_<module>.lora_down.weight, .lora_up.weight and .alpha (= its rank).

    A fused projection's q, k and v LoRAs are stacked: down = [A_q; A_k; A_v], up block-diagonal (q's rows
    see only A_q's rank block, and so on), with zero rows for linear1's MLP."""
    out = {}
    for module, parts in weights.items():
        if is_fused_qkv(module):
            a = torch.cat([parts[p][0] for p in "qkv"])
            b = torch.block_diag(*(parts[p][1] for p in "qkv"))
            if module.endswith("linear1"):
                b = torch.cat([b, b.new_zeros(_mlp_width(weights), b.shape[1])])
        else:
            a, b = parts["all"]
        name = KOHYA_PREFIX + module.replace(".", "_")
        out[f"{name}.lora_down.weight"] = a.float().clone(memory_format=torch.contiguous_format)
        out[f"{name}.lora_up.weight"] = b.float().clone(memory_format=torch.contiguous_format)
        out[f"{name}.alpha"] = torch.tensor(float(a.shape[0]))
    return out


_KOHYA_KEY = re.compile(r"lora_unet_(double_blocks|single_blocks)_(\d+)_(\w+?)\.(lora_down\.weight|lora_up\.weight|alpha)")


def _bfl_module(root: str, index: str, inner: str) -> str:
    """("double_blocks", "3", "img_attn_qkv") -> "double_blocks.3.img_attn.qkv"; "linear1" stays."""
    head, _, tail = inner.rpartition("_")
    return f"{root}.{index}.{head}.{tail}" if head else f"{root}.{index}.{tail}"


def from_kohya(tensors: dict[str, Tensor], where: str) -> Parts:
    """A kohya FLUX LoRA on the GSTLoRA's layers (as other tools write them), as parts; a fused projection
    is split into q, k and v by _split_fused."""
    halves: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KOHYA_KEY.fullmatch(key)
        if m is None:
            raise ExportError(f"{where}: {key!r} is not a kohya FLUX LoRA name (lora_unet_<module>.lora_down.weight, "
                              ".lora_up.weight, .alpha)")
        halves.setdefault(_bfl_module(*m.groups()[:3]), {})[m.group(4).split(".")[0]] = tensor
    weights: Parts = {}
    for module, pair in halves.items():
        if "lora_down" not in pair or "lora_up" not in pair:
            raise ExportError(f"{where}: {module} needs both lora_down and lora_up")
        a, b = pair["lora_down"].float(), pair["lora_up"].float()
        b = b * (float(pair["alpha"]) / a.shape[0]) if "alpha" in pair else b  # the update is scaled by alpha / rank
        weights[module] = _split_fused(module, a, b, where) if is_fused_qkv(module) else {"all": (a, b)}
    return weights


# ---------------------------------------------------------------------------------------------------
# Files and the command line
# ---------------------------------------------------------------------------------------------------

def _save(tensors: dict[str, Tensor], path: Path) -> Path:
    with atomic_path(path) as temp:
        save_file(tensors, temp)
    return path


FORMATS = {"diffusers": (DIFFUSERS_FILE, diffusers_state_dict), "comfyui": (COMFYUI_FILE, kohya_state_dict)}


def export_gstlora(source: str | Path, out: str | Path, formats: tuple[str, ...] = ("diffusers", "comfyui")) -> list[Path]:
    """Write out/pytorch_lora_weights.safetensors (diffusers/PEFT names) and/or out/gstlora_comfyui.safetensors
    (kohya names), each in its own layout (see the module docstring)."""
    weights = read_gstlora(source)
    out = Path(out)
    return [_save(layout(weights), out / file) for name, (file, layout) in FORMATS.items() if name in formats]


def import_comfyui(source: str | Path, out: str | Path) -> Path:
    """A ComfyUI FLUX LoRA on the GSTLoRA's layers -> out/pytorch_lora_weights.safetensors: kohya names
    (lora_unet_..., as export_gstlora and other tools write them), or the release's names."""
    source = Path(source).expanduser()
    if not source.is_file():
        raise ExportError(f"{source}: no such LoRA file")
    tensors = read_tensors(source)
    if any(key.startswith(KOHYA_PREFIX) for key in tensors):
        weights = from_kohya(tensors, str(source))
    else:
        weights = read_gstlora(source)
    return _save(diffusers_state_dict(weights), Path(out) / DIFFUSERS_FILE)


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="python -m slideredit.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="?", help="GSTLoRA file or checkpoint folder (what load_gstlora reads)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--format", choices=("both", "diffusers", "comfyui"), default="both",
                        help="diffusers: pytorch_lora_weights.safetensors (diffusers/PEFT names); comfyui: "
                             "gstlora_comfyui.safetensors (kohya names, for ComfyUI's LoRA loader); both (default)")
    parser.add_argument("--from-comfyui", type=Path, metavar="FILE",
                        help="import instead: a kohya/ComfyUI FLUX LoRA -> OUT/pytorch_lora_weights.safetensors")
    args = parser.parse_args(argv)
    if (args.source is None) == (args.from_comfyui is None):
        parser.error("give a GSTLoRA to export, or --from-comfyui FILE to import (one of the two)")
    if args.from_comfyui is not None:
        written = [import_comfyui(args.from_comfyui, args.out)]
    else:
        formats = ("diffusers", "comfyui") if args.format == "both" else (args.format,)
        written = export_gstlora(args.source, args.out, formats)
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    try:
        main()
    except (ExportError, CheckpointError, OSError) as err:
        raise SystemExit(f"error: {err}") from None
