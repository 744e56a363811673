r"""Export a GSTLoRA for the tools people already run, and import it back.

    python -m slideredit.export runs/gst/checkpoint-400 --out exported/
    python -m slideredit.export runs/gst/checkpoint-400 --out exported/ --format comfyui
    python -m slideredit.export --from-comfyui exported/gstlora_comfyui.safetensors --out back/

writes, from any GSTLoRA file or folder `load_gstlora` reads (the release's names or BFL-style names):
- (a) `pytorch_lora_weights.safetensors`: diffusers/PEFT LoRA names with the `transformer.` prefix, as
  the release ships it: `transformer.transformer_blocks.0.attn.to_q.lora_A.weight` (r, d_in) and
  `.lora_B.weight` (d_out, r); q, k and v are separate LoRAs. diffusers'
  `FluxKontextPipeline.load_lora_weights` + `set_adapters([name], [alpha])` loads it.
- (b) `gstlora_comfyui.safetensors`: the same tensors under the same names, for ComfyUI. Its LoRA loader
  maps a FLUX LoRA's diffusers names onto its fused BFL weights, q, k and v as row slices of `qkv` and of
  the single blocks' `linear1` (comfy.utils.flux_to_diffusers), so every projection keeps its rank-r LoRA.
  Kohya names (`lora_unet_<BFL module>`) cannot say that for `linear1`: diffusers' kohya converter splits
  it into q, k, v and the MLP (`proj_mlp`), so a fused rank-3r LoRA with zero MLP rows would load there as
  four rank-3r LoRAs per single block, one of them all zero (3x the LoRA compute); and in a file that
  mixes kohya and diffusers names, that converter keeps only the diffusers names. `--from-comfyui` reads
  this file and kohya files other tools write.

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
# Writing (diffusers / PEFT names, both files) and reading kohya files
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


def export_gstlora(source: str | Path, out: str | Path, formats: tuple[str, ...] = ("diffusers", "comfyui")) -> list[Path]:
    """Write out/pytorch_lora_weights.safetensors (diffusers/PEFT) and/or out/gstlora_comfyui.safetensors.

    Both hold the same tensors: per-projection rank-r LoRAs under diffusers names, the one layout that
    diffusers and ComfyUI both load without a LoRA on linear1's MLP rows (see the module docstring)."""
    tensors = diffusers_state_dict(read_gstlora(source))
    out = Path(out)
    files = {"diffusers": DIFFUSERS_FILE, "comfyui": COMFYUI_FILE}
    return [_save(tensors, out / files[name]) for name in files if name in formats]


def import_comfyui(source: str | Path, out: str | Path) -> Path:
    """A ComfyUI FLUX LoRA on the GSTLoRA's layers -> out/pytorch_lora_weights.safetensors: kohya names
    (lora_unet_..., as other tools write them), or the names export_gstlora writes."""
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
                        help="diffusers: pytorch_lora_weights.safetensors; comfyui: gstlora_comfyui.safetensors "
                             "(the same tensors, for ComfyUI's LoRA loader); both (default)")
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
