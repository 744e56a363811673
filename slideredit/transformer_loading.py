"""Loading the official FLUX.1 Kontext transformer weights into `Flux`.

Accepted sources: a BFL single file (`flux1-kontext-dev.safetensors`, optionally with keys prefixed
`model.diffusion_model.`), a diffusers `transformer/` folder (single or sharded safetensors + index +
`config.json`), a full model folder holding either, or a hub repo id. The diffusers layout is converted
to BFL's on the fly (FLUX_KONTEXT.md section 3): q/k/v are fused along the output rows, the single
blocks' q/k/v/mlp are fused into `linear1`, and the final adaLN halves are swapped.

Loading streams (slideredit/checkpoint.py): the conversion is a plan of row pieces, the model is
allocated once on its device in its final dtype, and each stored tensor is read into its rows.
Peak memory: the model plus the largest stored tensor. `quantize="fp8"` quantizes the block linears
per tensor as they are read (slideredit/quantization.py); fp8 single files are accepted as they are.
"""
from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import (CheckpointError, Piece, Plan, StoredTensor, assign_tensors, check_state_dict,
                         download_from_hub, file_order, identity_plan, index_safetensors,
                         looks_like_repo_id, map_stored, plan_shapes, read_into, sharded_files)
from .quantization import (Fp8Linear, fp8_targets, split_stored_scales, stored_scale_rows, stored_values,
                           swap_in_fp8, write_fp8_rows)
from .transformer import Flux, FluxParams

BFL_PREFIX = "model.diffusion_model."
DIFFUSERS_STEM = "diffusion_pytorch_model"

# Non-block renames, diffusers -> BFL (weights and biases alike).
_TOP_LEVEL = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "proj_out": "final_layer.linear",
}

# Double-block renames, diffusers -> BFL, for modules that map one to one.
_DOUBLE_RENAMES = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
    "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}

# Fused projections in BFL: BFL module -> the diffusers modules concatenated along the output rows.
_DOUBLE_FUSED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_SINGLE_RENAMES = {
    "norm.linear": "modulation.lin",
    "attn.norm_q.weight": "norm.query_norm.scale",
    "attn.norm_k.weight": "norm.key_norm.scale",
    "proj_out": "linear2",
}
_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}


def _rename(name: str, table: dict[str, str]) -> str | None:
    for src, dst in table.items():
        if name == src or name.startswith(src + "."):
            return dst + name[len(src):]
    return None


def diffusers_to_bfl_plan(shapes: dict[str, torch.Size]) -> Plan:
    """How to build each BFL tensor from a diffusers `FluxTransformer2DModel` checkpoint's tensors.

    Fused projections are several pieces stacked along the output rows; `norm_out.linear` is one
    tensor read as two swapped halves. Tensors that fit no rule keep their own name, so the model
    check reports them as unexpected; so do the parts of a fusion with a part missing."""
    plan: Plan = {}
    taken: set[str] = set()

    def add(new: str, pieces: list[Piece]) -> None:
        if new in plan:
            raise CheckpointError(f"tensors {plan[new][0].source!r} and {pieces[0].source!r} both map to {new!r}")
        plan[new] = pieces

    # Fusions first: they consume several diffusers tensors each.
    blocks = (("transformer_blocks", "double_blocks", _DOUBLE_FUSED), ("single_transformer_blocks", "single_blocks", _SINGLE_FUSED))
    for diff_root, bfl_root, fused in blocks:
        indices = sorted({int(m.group(1)) for k in shapes if (m := re.match(rf"{diff_root}\.(\d+)\.", k))})
        for i in indices:
            for bfl_name, parts in fused.items():
                for suffix in ("weight", "bias"):
                    keys = [f"{diff_root}.{i}.{p}.{suffix}" for p in parts]
                    if all(k in shapes for k in keys):
                        at = [0]
                        for k in keys[:-1]:
                            at.append(at[-1] + shapes[k][0])
                        add(f"{bfl_root}.{i}.{bfl_name}.{suffix}", [Piece(k, None, a) for k, a in zip(keys, at)])
                        taken.update(keys)

    for name in shapes:
        if name in taken:
            continue
        if name.startswith("norm_out.linear."):
            half = shapes[name][0] // 2  # diffusers stores [scale ; shift], BFL [shift ; scale]
            add("final_layer.adaLN_modulation.1." + name.rsplit(".", 1)[1],
                [Piece(name, (half, 2 * half), 0), Piece(name, (0, half), half)])
            continue
        if m := re.match(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", name):
            root, i, rest = m.groups()
            double = root == "transformer_blocks"
            renamed = _rename(rest, _DOUBLE_RENAMES if double else _SINGLE_RENAMES)
            new = f"{'double_blocks' if double else 'single_blocks'}.{i}.{renamed}" if renamed else name
        else:
            new = _rename(name, _TOP_LEVEL) or name
        add(new, [Piece(name)])
    return plan


def diffusers_to_bfl(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Convert an in-memory diffusers state dict to BFL names by the same plan (works on meta tensors).

    Returns (converted, source) where source maps each BFL name to the (first) diffusers name it was
    made from."""
    plan = diffusers_to_bfl_plan({k: v.shape for k, v in sd.items()})
    out = {}
    for new, pieces in plan.items():
        parts = [sd[p.source][p.rows[0]:p.rows[1]] if p.rows else sd[p.source] for p in pieces]
        out[new] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return out, {new: pieces[0].source for new, pieces in plan.items()}


def is_diffusers_layout(names) -> bool:
    return any(n.startswith(("transformer_blocks.", "x_embedder.", "single_transformer_blocks.")) for n in names)


# ---------------------------------------------------------------------------------------------------
# Model sizes
# ---------------------------------------------------------------------------------------------------

def params_from_config(config: dict) -> FluxParams:
    """FluxParams from a diffusers `transformer/config.json`."""
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    return FluxParams(
        in_channels=config.get("in_channels", 64),
        out_channels=config.get("out_channels") or config.get("in_channels", 64),
        vec_in_dim=config.get("pooled_projection_dim", 768),
        context_in_dim=config.get("joint_attention_dim", 4096),
        hidden_size=heads * head_dim,
        mlp_ratio=4.0,
        num_heads=heads,
        depth=config.get("num_layers", 19),
        depth_single_blocks=config.get("num_single_layers", 38),
        axes_dim=tuple(config.get("axes_dims_rope", (16, 56, 56))),
        guidance_embed=config.get("guidance_embeds", True),
    )


def default_axes_dim(head_dim: int) -> tuple[int, int, int]:
    """FLUX's split of the head dim between the (index, row, col) axes: 1/8 then two equal halves
    ((16, 56, 56) for 128, (8, 28, 28) for 64)."""
    first = head_dim // 8
    return first, (head_dim - first) // 2, (head_dim - first) // 2


def params_from_state_dict(sd: dict[str, torch.Size], fallback: FluxParams | None) -> FluxParams:
    """FluxParams read from BFL tensor shapes ({name: shape}); the RoPE split (not visible in shapes)
    from `fallback` when given, else FLUX's rule."""
    def shape(name: str) -> torch.Size:
        if name not in sd:
            raise CheckpointError(f"cannot infer the model size: tensor {name!r} is missing from the checkpoint")
        return sd[name]

    hidden, in_channels = shape("img_in.weight")
    head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale")[0] if "double_blocks.0.img_attn.norm.query_norm.scale" in sd \
        else shape("single_blocks.0.norm.query_norm.scale")[0]
    count = lambda root: len({k.split(".")[1] for k in sd if k.startswith(root + ".")})
    if fallback is not None:
        axes_dim, theta = fallback.axes_dim, fallback.theta
    else:
        axes_dim, theta = default_axes_dim(head_dim), 10_000
    mlp_rows = shape("double_blocks.0.img_mlp.0.weight")[0] if "double_blocks.0.img_mlp.0.weight" in sd \
        else shape("single_blocks.0.linear1.weight")[0] - 3 * hidden
    return FluxParams(
        in_channels=in_channels,
        out_channels=shape("final_layer.linear.weight")[0],
        vec_in_dim=shape("vector_in.in_layer.weight")[1],
        context_in_dim=shape("txt_in.weight")[1],
        hidden_size=hidden,
        mlp_ratio=mlp_rows / hidden,
        num_heads=hidden // head_dim,
        depth=count("double_blocks"),
        depth_single_blocks=count("single_blocks"),
        axes_dim=axes_dim,
        theta=theta,
        qkv_bias=any(k.endswith("attn.qkv.bias") for k in sd) or "single_blocks.0.linear1.bias" in sd,
        guidance_embed="guidance_in.in_layer.weight" in sd,
    )


# ---------------------------------------------------------------------------------------------------
# Finding the checkpoint
# ---------------------------------------------------------------------------------------------------

def _bfl_file_in(folder: Path) -> Path | None:
    preferred = folder / "flux1-kontext-dev.safetensors"
    if preferred.is_file():
        return preferred
    candidates = sorted(folder.glob("flux1-*.safetensors"))
    return candidates[0] if candidates else None


def find_transformer_files(source: str | os.PathLike) -> tuple[list[Path], dict | None]:
    """-> (safetensors files of one transformer checkpoint, diffusers config or None)."""
    if looks_like_repo_id(source):
        folder = download_from_hub(str(source), ["transformer/*.json", "transformer/*.safetensors"])
        if not (folder / "transformer").is_dir():  # a BFL-only repo: its top-level single file
            folder = download_from_hub(str(source), ["flux1-*.safetensors"], ignore_patterns=["*/*"])
        source = folder
    path = Path(source).expanduser()
    if path.is_file():
        return [path], None
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or folder (and not a hub repo id of the form owner/name)")

    for folder in (path, path / "transformer"):
        files = sharded_files(folder, DIFFUSERS_STEM)
        if files:
            config_file = folder / "config.json"
            config = json.loads(config_file.read_text()) if config_file.is_file() else None
            return files, config
    bfl = _bfl_file_in(path)
    if bfl is not None:
        return [bfl], None
    found = ", ".join(sorted(p.name for p in path.iterdir())[:20]) or "nothing"
    raise CheckpointError(
        f"{path}: no FLUX transformer checkpoint found. Looked for a diffusers transformer "
        f"({DIFFUSERS_STEM}.safetensors or its .index.json, in the folder or in transformer/) and a BFL "
        f"single file (flux1-*.safetensors). Found: {found}")


# ---------------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------------

QUANTIZE_MODES = (None, "fp8")


def _strip_prefix(index: dict[str, StoredTensor]) -> dict[str, StoredTensor]:
    if any(k.startswith(BFL_PREFIX) for k in index):
        return {k.removeprefix(BFL_PREFIX): v for k, v in index.items()}
    return index


def _stream(model: Flux, plan: Plan, index: dict[str, StoredTensor], scales: dict[str, Tensor],
            device: torch.device) -> None:
    """Allocate each tensor of the (meta-device) model once, on `device` in its final dtype, and fill it
    piece by piece in file order; each stored tensor is mapped, copied and dropped. A stored tensor that
    already is a whole CPU model tensor (same dtype, unscaled) is kept as its mapping, not copied.
    Plain copies run on a few threads (the kernel copies from the page cache on each, in parallel)."""
    wanted = {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}
    fp8_layers = {f"{name}.weight": name for name, m in model.named_modules() if isinstance(m, Fp8Linear)}
    real: dict[str, Tensor] = {}

    def target(name: str) -> Tensor:
        if name not in real:
            shape, dtype = wanted[name]
            real[name] = torch.empty(shape, dtype=dtype, device=device)
        return real[name]

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        copies = []
        for name, piece in file_order(plan, index):
            stored = index[piece.source]
            rows = piece.row_range(index)
            scale = stored_scale_rows(scales, piece.source, rows)
            plain = scale is None and stored.dtype == wanted[name][1] and device.type == "cpu"
            if name in fp8_layers:
                try:
                    write_fp8_rows(target(name), target(f"{fp8_layers[name]}.weight_scale"), piece.at,
                                   map_stored(stored, piece.rows), scale)
                except ValueError as err:
                    raise CheckpointError(f"{stored.path}: tensor {piece.source!r} {err}") from None
            elif plain and len(plan[name]) == 1 and piece.rows is None:
                real[name] = map_stored(stored).view(wanted[name][0])  # the mapping itself: nothing copied
            else:
                out = target(name)
                out = out[piece.at:piece.at + rows[1] - rows[0]] if out.ndim else out
                if plain:
                    copies.append(pool.submit(read_into, stored, piece.rows, out))
                else:  # the mapped rows are converted on the way and dropped right after
                    out.copy_(stored_values(map_stored(stored, piece.rows), scale))
        for copy in copies:
            copy.result()  # re-raises a failed read
    assign_tensors(model, real)


def empty_flux(params: FluxParams, dtype: torch.dtype = torch.bfloat16, quantize: str | None = None) -> Flux:
    """The model load_flux fills, on the meta device (no memory): `dtype` everywhere, and with
    quantize="fp8" the block linears as empty Fp8Linear (fp8 weights, fp32 row scales)."""
    with torch.device("meta"):
        model = Flux(params).to(dtype)
    if quantize == "fp8":
        swap_in_fp8(model, fp8_targets(model))
    return model


def load_flux(source: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
              params: FluxParams | None = None, quantize: str | None = None) -> Flux:
    """Load FLUX.1 Kontext [dev] (or any FLUX.1 transformer) from an official checkpoint, frozen.

    Sizes come from the diffusers `config.json` when present, else from the tensor shapes; `params`
    supplies what neither holds (the RoPE split) and is checked against the checkpoint otherwise.
    `quantize="fp8"`: the block linears become `Fp8Linear` (float8_e4m3fn weights, one fp32 scale per
    output row), quantized tensor by tensor while reading; the rest is in `dtype`. fp8 checkpoints
    (ComfyUI's, with or without scales) load in either mode: their fp8 bytes are kept as they are when
    quantizing, dequantized to `dtype` otherwise."""
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, got {quantize!r}")
    files, config = find_transformer_files(source)
    index = _strip_prefix(index_safetensors(files))
    index, scales = split_stored_scales(index)
    plan = diffusers_to_bfl_plan({k: torch.Size(v.shape) for k, v in index.items()}) if is_diffusers_layout(index) \
        else identity_plan(index)
    shapes = plan_shapes(plan, index)
    origin = {name: index[pieces[0].source].path for name, pieces in plan.items()}

    found = params_from_config(config) if config is not None else params_from_state_dict(shapes, params)
    if params is not None and params != found:
        diffs = {f: (getattr(params, f), getattr(found, f)) for f in params.__dataclass_fields__
                 if getattr(params, f) != getattr(found, f)}
        raise CheckpointError(f"params disagree with the checkpoint {files[0]}: "
                              + ", ".join(f"{f}={a} given but {b} found" for f, (a, b) in diffs.items()))
    model = empty_flux(found, dtype, quantize)
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.endswith(".weight_scale")}
    check_state_dict(expected, shapes, origin, what="FLUX transformer")

    _stream(model, plan, index, scales, torch.device(device))
    return model.eval().requires_grad_(False)

