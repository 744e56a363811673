"""Edit an image with FLUX.1 Kontext [dev], optionally with SliderEdit sliders (one edit, or a sweep).

With no arguments: the embedded demo. The toy Kontext model bundled in assets/toy-kontext (trained on a
CPU, see its README) edits its example scene, sweeping its two STLoRA sliders over a grid:
    python infer.py

One edit with the real model (the format follows --out's extension: .png, .jpg/.jpeg or .webp; an existing
file is replaced only with --overwrite):
    python infer.py --model black-forest-labs/FLUX.1-Kontext-dev --image photo.png --prompt "make the sky pink" \\
        --out edited.png

GSTLoRA sweep (one global slider; writes a labelled grid PNG, a GIF and sweep.json into the --out folder):
    python infer.py --model black-forest-labs/FLUX.1-Kontext-dev --image photo.png --prompt "make the sky pink" \\
        --gstlora ckpt/ --alphas -1 -0.5 0 0.5 1

STLoRA sweep (one slider per sub-prompt; with two sub-prompts the grid covers both sliders; with three or
more, sweep one of them with --sweep-slider N while the others stay at --slider-alphas, or 0):
    python infer.py --model black-forest-labs/FLUX.1-Kontext-dev --image face.png --stlora selective_lora.pt \\
        --subprompts "add a hat" "make the hair red" --alphas -1,0,1

One edit with sliders (one alpha per sub-prompt for STLoRA, one alpha for GSTLoRA):
    python infer.py ... --stlora selective_lora.pt --subprompts "add a hat" "make the hair red" \\
        --slider-alphas 1 -0.5 --out hat-gone.png

Alpha 0 is the base edit, 1 suppresses the instruction, negative values exaggerate it. Sliders are trained
for alphas in [-1, 1] (the release validates -1.5 .. 1.5); alphas must be finite, and beyond |alpha| > 10
infer.py warns once (the edit turns to noise). Every cell of a sweep uses the same seed, and the prompt is
encoded once per sweep. An existing --out folder is replaced only if it holds nothing but a previous
sweep's files, and only when the new sweep is complete: each cell is written, as soon as it is made, into a
hidden work folder beside --out (.NAME.partial, with manifest.json); when every cell is there the sweep's
folder is swapped in for --out at once and the work folder removed. An interrupted sweep (Ctrl-C, a kill)
leaves --out as it was, and the same command again makes only the missing cells; a cell made with other
settings (seed, steps, guidance, size, dtype, device, the image's or the adapter's bytes, ...) is made again.

A sweep on several GPUs (or CPU processes): torchrun splits its cells (in --batch-size batches) over the
ranks, one GPU per rank, and rank 0 writes the sweep folder, the same files as one process (and the work
folder: a killed torchrun sweep goes on as one process, or with any number of processes, and vice versa):
    torchrun --nproc_per_node 4 infer.py --model ... --image face.png --stlora ... --subprompts ... --alphas ...
"""
from __future__ import annotations

# Only fast imports here: --help and argument errors must not wait for torch (imported after parsing).
import argparse
import itertools
import json
import shutil
import signal
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from slideredit.cli import finite_float, join_alphas, parse_alphas, positive_int, torchrun_rank, writable_problem
from slideredit.grids import IMAGE_FORMATS
from slideredit.hub import looks_like_repo_id

if TYPE_CHECKING:
    from slideredit.training.distributed import Distributed

TOY_MODEL = Path(__file__).resolve().parent / "assets" / "toy-kontext"
DEFAULT_MODEL = str(TOY_MODEL)  # the embedded default; the real model: black-forest-labs/FLUX.1-Kontext-dev
ALPHA_WARNING = 10.0  # |alpha| beyond this is far outside any trained range
ASPECT_NOTICE = 0.10  # tell the user when resizing changes the aspect ratio by more than this (relative)
SWEEP_ENTRIES = {"sweep.json", "source.png", "grid.png", "sweep.gif", "cells", "index.html"}  # what a sweep folder holds
WORK_MANIFEST = "manifest.json"  # in a sweep's work folder: the cells made so far (sharding.CellManifest)
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default=None,
                        help="the image to edit (any format PIL reads); default: the model folder's example.png "
                             "(the toy model has one), then with no --prompt and no adapter its example sweep")
    parser.add_argument("--prompt", default=None,
                        help="the edit instruction (STLoRA: defaults to the sub-prompts joined by ' and ')")
    parser.add_argument("--out", default=None,
                        help="one edit: the image file, .png, .jpg/.jpeg or .webp (default outputs/edit.png); "
                             "a sweep: its folder (default outputs/sweep), replaced when the sweep completes (until then its "
                             "cells wait beside it, in .NAME.partial, for a rerun after a kill to go on from)")
    parser.add_argument("--overwrite", action="store_true",
                        help="one edit: replace an existing --out file (refused otherwise). A sweep replaces a "
                             "previous sweep's folder without it, and never a folder holding other files")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="a diffusers-layout Kontext folder or hub repo id (default: %(default)s)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="denoising steps (default: 28, or the model folder's example.json)")
    parser.add_argument("--guidance", type=finite_float, default=2.5,
                        help="distilled guidance strength, a finite number (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise, shared by every cell (default: %(default)s)")
    parser.add_argument("--height", type=positive_int, default=None,
                        help="output height in pixels, at least 16 (default: the context image's size)")
    parser.add_argument("--width", type=positive_int, default=None, help="output width in pixels (give with --height)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--keep-size", dest="auto_resize", action="store_const", const=False, default=None,
                      help="keep the input image's own size (floored to 16 px)")
    size.add_argument("--snap-size", dest="auto_resize", action="store_const", const=True,
                      help="snap the input image to the nearest preferred Kontext resolution (about one "
                           "megapixel). Default: the model folder's slideredit.json says (the toy model keeps "
                           "the size; FLUX.1 Kontext [dev] snaps)")
    parser.add_argument("--gstlora", default=None, help="GSTLoRA checkpoint (pytorch_lora_weights.safetensors or its folder)")
    parser.add_argument("--stlora", default=None, help="STLoRA checkpoint (selective_lora.pt / .safetensors or its folder)")
    parser.add_argument("--subprompts", nargs="+", default=None, help="STLoRA: the sub-instructions, one slider each")
    parser.add_argument("--alphas", type=parse_alphas, default=[-1.0, -0.5, 0.0, 0.5, 1.0],
                        help="distinct slider values of a sweep, separated by commas or spaces "
                             "(default: -1,-0.5,0,0.5,1)")
    parser.add_argument("--slider-alphas", default=None,
                        type=lambda text: parse_alphas(text, flag="--slider-alphas", distinct=False),
                        help="one edit, no sweep: one alpha per slider (STLoRA: one per sub-prompt, in order; "
                             "GSTLoRA: one). With --sweep-slider: the values the other sliders are held at")
    parser.add_argument("--sweep-slider", type=positive_int, default=None, metavar="N",
                        help="STLoRA: sweep only sub-prompt N (1 = the first) over --alphas, holding the others at "
                             "--slider-alphas (default 0). Needed with three or more sub-prompts")
    parser.add_argument("--device", default=None, help="torch device: cpu, cuda, cuda:1, mps (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                        help="weights and activations dtype; auto: bfloat16 on a GPU, float32 on the CPU "
                             "(CPUs without bfloat16 units run it many times slower) (default: %(default)s)")
    parser.add_argument("--offload", action="store_true", default=None,
                        help="keep the text encoders on the CPU except while encoding (default with --quantize fp8, "
                             "which also moves the transformer to the CPU while they encode)")
    parser.add_argument("--quantize", choices=["fp8"], default=None,
                        help="low-memory mode: the transformer's block linears in float8_e4m3fn with one scale per "
                             "row (sliders stay exact, unquantized, on top); the text encoders are offloaded and images decoded in exact strips")
    parser.add_argument("--t5-quantize", choices=["fp8"], default=None,
                        help="hold T5's linears (all but the feed-forward output) in fp8 (T5-XXL: 5.9 GB instead of "
                             "9.5 GB): on the device beside the transformer, or with --quantize fp8 offloaded as well")
    parser.add_argument("--slider-start", type=fraction, default=0.0, metavar="F",
                        help="sliders act from this fraction of the denoising steps on (0 <= F < 1; default 0: "
                             "the whole trajectory); the first steps stay the base edit, which keeps the layout")
    parser.add_argument("--batch-size", type=positive_int, default=None, metavar="N",
                        help="sweeps: cells rendered per pipeline call (same noise and prompt encoding per cell); "
                             "default 1 on the CPU, on a GPU as many as a quarter of its free memory holds")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the transformer's blocks (slider changes never recompile)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check every argument that can be checked without torch or the model."""
    parser = build_parser()
    args = parser.parse_args(join_alphas(sys.argv[1:] if argv is None else argv))
    problem = model_problem(args.model)  # first: the other defaults (--image, --steps) come from the folder
    if problem:
        parser.error(f"--model {args.model}: {problem}")
    example = read_example(args.model)
    if args.image is None:
        if example is None:
            parser.error(f"--image is required: {args.model} has no example.json to edit by default")
        args.image = str(Path(args.model) / "example.png")
        if args.prompt is None and not (args.gstlora or args.stlora or args.subprompts):  # the example sweep
            args.stlora, args.subprompts = str(Path(args.model) / "sliders" / "stlora"), example["subprompts"]
    elif not Path(args.image).is_file():
        parser.error(f"--image {args.image}: no such file")
    if args.steps is None:
        args.steps = (example or {}).get("steps", 28)
    if (args.height is None) != (args.width is None):
        parser.error("give --height and --width together, or neither")
    if args.height is not None and min(args.height, args.width) < 16:
        parser.error(f"--height and --width must be at least 16 pixels, got {args.height}x{args.width}")
    check_sliders(parser, args)
    check_instructions(parser, args)
    if args.prompt is None:
        if not args.subprompts:
            parser.error("--prompt is required (except for an STLoRA sweep, which joins the sub-prompts)")
        args.prompt = " and ".join(args.subprompts)
    args.sweep = bool(args.gstlora or args.stlora) and (args.slider_alphas is None or args.sweep_slider is not None)
    args.out = Path(args.out or ("outputs/sweep" if args.sweep else "outputs/edit.png"))
    rank, processes = torchrun_rank()
    if processes > 1 and not args.sweep:
        parser.error(f"torchrun's {processes} processes split a sweep's cells; one edit runs in one process: "
                     "run it without torchrun")
    problem = None
    if rank == 0:  # rank 0 alone writes: torchrun's other ranks may run on machines without --out's folder
        problem = sweep_out_problem(args.out) if args.sweep else edit_out_problem(args.out, args.overwrite)
    if problem:
        parser.error(f"--out {args.out}: {problem}")
    far = [f"{alpha:g}" for alpha in dict.fromkeys((args.alphas if args.sweep else []) + (args.slider_alphas or []))
           if abs(alpha) > ALPHA_WARNING]
    if far:  # once, here; the pipeline's own warning for each slider and image is silenced (edit())
        which = f"alpha {far[0]} is" if len(far) == 1 else f"alphas {', '.join(far)} are"
        print(f"warning: {which} far outside the range sliders are trained for ([-1, 1]; |alpha| <= "
              f"{ALPHA_WARNING:g} is the documented range): expect noise", file=sys.stderr)
    return args


def model_problem(model: str) -> str | None:
    """Why --model names neither a model folder nor a hub repo id, or None."""
    path = Path(model).expanduser()
    if path.is_dir():
        return None
    if path.exists():
        return "is a file; give a diffusers-layout model folder or a hub repo id (owner/name)"
    if looks_like_repo_id(model):
        return None
    return "model folder not found (and not a hub repo id of the form owner/name)"


def check_instructions(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """An empty or blank prompt or sub-prompt is an error, not an edit without an instruction."""
    if args.prompt is not None and not args.prompt.strip():
        parser.error(f"--prompt is {'empty' if not args.prompt else 'blank'}: give the edit instruction, "
                     "e.g. --prompt 'make the sky pink'")
    for number, text in enumerate(args.subprompts or [], start=1):
        if not text.strip():
            parser.error(f"--subprompts: sub-prompt {number} of {len(args.subprompts)} is "
                         f"{'empty' if not text else 'blank'}: give each sub-instruction as it appears in the prompt")


def check_sliders(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The adapter flags fit together: which adapter, its sub-prompts, and one alpha per slider."""
    if args.gstlora and args.stlora:
        parser.error("use one adapter at a time: --gstlora or --stlora")
    if args.subprompts and not args.stlora:
        parser.error("--subprompts needs --stlora (the STLoRA whose sliders they control)")
    if args.stlora and not args.subprompts:
        parser.error("--stlora needs --subprompts (the sub-instructions its sliders control)")
    if args.slider_alphas is not None and not (args.gstlora or args.stlora):
        parser.error("--slider-alphas needs --gstlora or --stlora (the sliders it sets)")
    if args.sweep_slider is not None and not args.stlora:
        parser.error("--sweep-slider picks one STLoRA sub-prompt to sweep: it needs --stlora and --subprompts")
    sliders = len(args.subprompts) if args.stlora else 1
    if args.slider_alphas is not None and len(args.slider_alphas) != sliders:
        what = f"{sliders} sub-prompt(s)" if args.stlora else "a GSTLoRA (one slider)"
        parser.error(f"--slider-alphas needs one alpha per slider: {sliders} for {what}, "
                     f"got {len(args.slider_alphas)} ({' '.join(f'{a:g}' for a in args.slider_alphas)})")
    if args.sweep_slider is not None and args.sweep_slider > sliders:
        parser.error(f"--sweep-slider {args.sweep_slider}: there are only {sliders} sub-prompt(s) (1 .. {sliders})")
    if args.stlora and sliders > 2 and args.slider_alphas is None and args.sweep_slider is None:
        parser.error(f"{sliders} sub-prompts would sweep {len(args.alphas)}^{sliders} = "
                     f"{len(args.alphas) ** sliders} cells: sweep one slider with --sweep-slider N (the others "
                     f"at 0, or at --slider-alphas), or make one edit with --slider-alphas")


def edit_out_problem(out: Path, overwrite: bool) -> str | None:
    """Why one edit could not be saved at `out`, found before any computing, or None. An existing file is
    replaced only when `overwrite` (it may be the user's own picture)."""
    if out.is_dir():
        return "is an existing folder; one edit writes one image file, e.g. " + str(out / "edit.png")
    if out.exists() and not overwrite:
        return "exists; give another file name, or --overwrite to replace it"
    if out.suffix.lower() not in IMAGE_FORMATS:
        return (f"cannot tell the image format from the extension {out.suffix or '(none)'!r}; "
                f"use {', '.join(IMAGE_FORMATS)}")
    return writable_problem(out)


def sweep_out_problem(out: Path) -> str | None:
    """Why a sweep could not go into the folder `out`, found before any computing, or None. An existing
    folder may be replaced only when it holds nothing but a previous sweep (never the user's own files)."""
    if out.exists() and not out.is_dir():
        return "is an existing file; a sweep writes a folder (grid.png, sweep.gif, sweep.json, cells/)"
    if not out.exists() and out.suffix.lower() in IMAGE_FORMATS:
        return "looks like an image file, but a sweep writes a folder (grid.png, sweep.gif, sweep.json, cells/)"
    if work_folder(out).exists() and not work_folder(out).is_dir():
        return f"cannot keep the sweep's cells in {work_folder(out)}: a file has that name"
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in SWEEP_ENTRIES
                         and not (p.name.startswith(".") and p.name.endswith(".tmp")))  # an atomic write's leftover
        if foreign:
            return (f"holds {foreign[0]!r}, which a sweep does not write; a sweep replaces its folder, so give a "
                    f"new or empty folder, or a previous sweep's")
    return writable_problem(out)


def read_example(model: str) -> dict | None:
    """A model folder's example.json: {"prompt", "subprompts", "steps"} of its bundled example.png."""
    path = Path(model) / "example.json"
    return json.loads(path.read_text()) if path.is_file() else None


def check_device(name: str | None) -> str:
    """The torch device to run on, checked to exist here before anything loads: a one-line error otherwise."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"--device {name!r}: infer.py runs on {', '.join(DEVICE_TYPES)}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"--device {name}: {why} (torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type != "cpu":
        backend = getattr(torch, device.type, None) if device.type != "mps" else torch.backends.mps
        if backend is None or not backend.is_available():
            raise ValueError(f"--device {name}: this machine or torch build has no {device.type} device; use --device cpu")
    return name


def fraction(text: str) -> float:
    value = finite_float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}")
    return value


def resolve_batch_size(pipe, args: argparse.Namespace) -> int:
    """--batch-size, or a default from the device's free memory: 1 on the CPU; on a GPU, cells whose
    activations (estimated as 64 bytes x hidden width per token of [noisy ; context ; text]) fill a
    quarter of the free memory, at most the sweep's cell count."""
    import torch

    if args.batch_size is not None:
        return args.batch_size
    if pipe.device.type != "cuda":
        return 1
    free, _ = torch.cuda.mem_get_info(pipe.device)
    p = pipe.transformer.params
    tokens = 2 * (1024 // 16) ** 2 + pipe.defaults.max_sequence_length  # a one-megapixel edit
    per_cell = 64 * p.hidden_size * tokens
    return max(1, min(len(sweep_cells(args)), int(free // 4 // per_cell)))


def device_memory_report(pipe) -> str:
    """What each component holds on the pipeline's CUDA device, and the peak so far (GiB)."""
    import torch

    def held(module) -> float:
        return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()]
                   if t.device == pipe.device) / 2**30

    parts = {"transformer": pipe.transformer, "autoencoder": pipe.autoencoder,
             "T5": pipe.text_encoders.t5, "CLIP": pipe.text_encoders.clip}
    held_text = ", ".join(f"{name} {held(module):.2f}" for name, module in parts.items())
    return f"device memory (GiB): {held_text}; peak {torch.cuda.max_memory_allocated(pipe.device) / 2**30:.2f}"


def resolve_dtype(name: str, device: str):
    """--dtype as a torch dtype; "auto" is bfloat16 on an accelerator and float32 on the CPU (on 2 busy CPU
    cores here, one cell of the toy demo took 4 s in float32 and 75 s in bfloat16)."""
    import torch

    if name == "auto":
        return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    return getattr(torch, name)


def resize_notice(width: int, height: int, auto_resize: bool) -> str | None:
    """A note when the context image's resize (snap or floor to 16) changes its aspect ratio by over 10%."""
    from slideredit.image import context_size

    w, h = context_size(width, height, auto_resize=auto_resize)
    before, after = width / height, w / h
    if abs(after / before - 1) <= ASPECT_NOTICE:
        return None
    how = ("snapped to the nearest preferred Kontext resolution; --keep-size keeps its own size" if auto_resize
           else "floored to multiples of 16 pixels")
    return (f"note: the {width}x{height} image (aspect {before:.2f}:1) is resized to {w}x{h} "
            f"(aspect {after:.2f}:1), {how}")


def sweep_cells(args: argparse.Namespace) -> list[tuple[float, ...]]:
    """One alpha per slider for every cell: a row for GSTLoRA, one sub-prompt or --sweep-slider, else
    (two sub-prompts) the grid over both."""
    if args.gstlora:
        return [(alpha,) for alpha in args.alphas]
    n = len(args.subprompts)
    if args.sweep_slider is not None:
        held, swept = list(args.slider_alphas or [0.0] * n), args.sweep_slider - 1
        return [tuple(alpha if i == swept else held[i] for i in range(n)) for alpha in args.alphas]
    return list(itertools.product(args.alphas, repeat=n))  # n is 1 or 2 here (parse_args)


def edit(pipe, args: argparse.Namespace, source, cells: list[tuple[float, ...]] | None = None, **embeds) -> list:
    """Edits of `source` in one pipeline call: one image per cell, the loaded adapter at that cell's alphas
    (one per slider), every image from the same seeded noise; one plain edit when `cells` is None."""
    import torch

    from slideredit.slider_schedule import AlphaRangeWarning

    sliders = {}
    if cells is not None:
        per_image = [list(column) for column in zip(*cells)]  # per slider: its alpha in each image
        sliders = (dict(slider_alpha=per_image[0]) if args.gstlora
                   else dict(subprompts_list=args.subprompts, slider_alpha_list=per_image))
        sliders["slider_steps"] = (args.slider_start, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AlphaRangeWarning)  # parse_args warned once for every alpha
        return pipe(image=source, prompt=args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
                    height=args.height, width=args.width, auto_resize=args.auto_resize,
                    generator=torch.Generator("cpu").manual_seed(args.seed), **embeds, **sliders).images


def sweep_picture(args: argparse.Namespace, source, images: dict):
    """The sweep's grid picture (slideredit.grids.sweep_grid): two sliders as rows x columns, else one row
    over the swept slider."""
    from slideredit.grids import SliderAxis, sweep_grid

    cells = list(images)
    if args.gstlora:
        return sweep_grid(source, images, SliderAxis(f"slider '{args.prompt}'", args.alphas))[0]
    names = [f"slider {i + 1} '{text}'" for i, text in enumerate(args.subprompts)]
    if len(cells[0]) == 2 and args.sweep_slider is None:  # rows: first slider, columns: second
        return sweep_grid(source, images, SliderAxis(names[1], args.alphas), SliderAxis(names[0], args.alphas),
                          title=f"prompt: '{args.prompt}'")[0]
    swept = 0 if args.sweep_slider is None else args.sweep_slider - 1
    held = [f"{names[i]} at {alpha:+.2f}" for i, alpha in enumerate(cells[0]) if i != swept]
    title = f"prompt: '{args.prompt}'" + ("; held: " + ", ".join(held) if held else "")
    return sweep_grid(source, {(alphas[swept],): image for alphas, image in images.items()},
                      SliderAxis(names[swept], args.alphas), title=title)[0]


def frame_caption(args: argparse.Namespace, alphas: tuple[float, ...]) -> str:
    """A GIF frame's caption: each slider's alpha, one line per slider, then a line naming the base edit
    (blank on the other frames: every frame has the same height, so the picture never jumps)."""
    names = [args.prompt] if args.gstlora else args.subprompts
    lines = [f"{alpha:+.2f} {name}" for name, alpha in zip(names, alphas)]
    return "\n".join(lines + ["base edit" if not any(alphas) else ""])


def work_folder(out: Path) -> Path:
    """Where a sweep into `out` keeps its cells until all are made: a hidden sibling, so that --out changes
    once, when the sweep is complete, and a rerun after a kill goes on from the cells already made."""
    return out.with_name(f".{out.name}.partial")


def cell_name(alphas: tuple[float, ...]) -> str:
    """A cell's image file, relative to the sweep folder (and to the work folder)."""
    return "cells/" + "_".join(f"{a:+.2f}" for a in alphas) + ".png"


def cell_keys(args: argparse.Namespace, auto_resize: bool,
              chunks: list[list[tuple[float, ...]]]) -> dict[tuple[float, ...], str]:
    """Per cell (its alphas), the key of everything its image is made from (sharding.CellManifest): the
    image's and the adapter's bytes, the instructions and every setting of the call, and the alphas of every
    cell in its batch (a pipeline call on several cells rounds differently from one on a single cell). The
    model is named, not hashed: its weights are tens of GB."""
    from slideredit.evaluation.sharding import digest, file_digest

    model = Path(args.model).expanduser()
    device = args.device.split(":")[0]  # the kind of device, not which one: the ranks of torchrun use several
    settings = {"model": str(model.resolve()) if model.is_dir() else args.model,
                "method": "stlora" if args.stlora else "gstlora",
                "adapter": file_digest(Path(args.stlora or args.gstlora)), "image": file_digest(Path(args.image)),
                "prompt": args.prompt, "subprompts": args.subprompts,
                "seed": args.seed, "steps": args.steps, "guidance": args.guidance, "size": [args.height, args.width],
                "auto_resize": auto_resize, "slider_start": args.slider_start,
                "dtype": str(resolve_dtype(args.dtype, args.device)), "device": device, "offload": args.offload,
                "quantize": args.quantize, "t5_quantize": args.t5_quantize, "compile": args.compile}
    return {alphas: digest({**settings, "alphas": list(alphas), "batch": [list(cell) for cell in chunk]})
            for chunk in chunks for alphas in chunk}


def run_sweep(pipe, args: argparse.Namespace, source, ranks: Distributed) -> Path:
    """Make the cells the work folder lacks, then the sweep folder from them, swapped in for args.out.

    Each cell is written atomically into the work folder (work_folder) as soon as its batch is made, and
    recorded in the folder's manifest with its key (cell_keys): a rerun renders only the batches holding a
    cell that is not done, each batch as it was (the same cells in one call, so the same bytes). Under
    torchrun the ranks render the batches in turn and rank 0 alone writes (evaluation/sharding.py)."""
    from tqdm.auto import tqdm

    from slideredit.evaluation.sharding import CellManifest, from_main, render_in_rounds
    from slideredit.grids import save_png

    cells = sweep_cells(args)
    batch = from_main(resolve_batch_size(pipe, args), ranks)  # rank 0's batches: the calls one process makes
    chunks = [cells[start:start + batch] for start in range(0, len(cells), batch)]
    work, todo = work_folder(args.out), None
    if ranks.is_main:
        manifest = CellManifest(work / WORK_MANIFEST)
        auto_resize = pipe.defaults.auto_resize if args.auto_resize is None else args.auto_resize
        keys = cell_keys(args, auto_resize, chunks)
        todo = [chunk for chunk in chunks if not all(manifest.is_done(cell_name(a), keys[a]) for a in chunk)]
        done = len(cells) - sum(map(len, todo))
        if done:
            print(f"infer.py: {done} of {len(cells)} cells were made by an interrupted run ({work}); making "
                  f"the other {len(cells) - done}", file=sys.stderr)
    todo = from_main(todo, ranks)
    embeds, pooled = pipe.encode_prompt(args.prompt)  # once for the whole sweep
    pipe.set_progress_bar_config(disable=True)  # one bar over the cells instead of one per cell
    rendered = render_in_rounds(todo, lambda chunk: edit(pipe, args, source, chunk, prompt_embeds=embeds,
                                                         pooled_prompt_embeds=pooled), ranks)
    if not ranks.is_main:
        for _ in rendered:  # this rank's share of the rounds; the images go to rank 0, which writes them
            pass
        return args.out
    with tqdm(total=len(cells), initial=done, desc="sweep", unit="cell") as bar:
        for chunk, chunk_images in rendered:
            for alphas, image in zip(chunk, chunk_images, strict=True):
                save_png(image, work / cell_name(alphas))
                manifest.record(cell_name(alphas), keys[alphas])
            bar.update(len(chunk))
    write_sweep_folder(args, source, work, cells)
    shutil.rmtree(work)  # complete: a rerun makes every cell again, as a first run does
    print(f"wrote {len(cells)} cells, {args.out / 'grid.png'}, {args.out / 'sweep.gif'}, {args.out / 'sweep.json'} "
          f"and {args.out / 'index.html'} (open it in a browser to drag the sliders)")
    return args.out


def write_sweep_folder(args: argparse.Namespace, source, work: Path, cells: list[tuple[float, ...]]) -> None:
    """The sweep folder, from the cells in the work folder (copied as they are): the source, the grid, the
    GIF, sweep.json and the explorer page, written into a temporary folder swapped in for args.out."""
    from PIL import Image

    from slideredit.atomic import atomic_folder
    from slideredit.evaluation.sweep import Sweep, SweepCell, write_sweep
    from slideredit.explorer import write_explorer
    from slideredit.grids import cell_scale, enlarge, motion_order, save_gif, save_png, with_caption

    with atomic_folder(args.out) as folder:
        (folder / "cells").mkdir()
        save_png(source, folder / "source.png")
        images = {}
        for alphas in cells:
            shutil.copyfile(work / cell_name(alphas), folder / cell_name(alphas))
            with Image.open(work / cell_name(alphas)) as image:
                images[alphas] = image.convert("RGB")  # PNG is lossless: the pixels the pipeline made
        save_png(sweep_picture(args, source, images), folder / "grid.png")
        scale = cell_scale(next(iter(images.values())).size)
        save_gif([with_caption(enlarge(images[alphas], scale), frame_caption(args, alphas))
                  for alphas in motion_order(list(images))], folder / "sweep.gif")
        write_sweep(folder, Sweep(source_image="source.png", prompt=args.prompt, subprompts=args.subprompts,
                                  seed=args.seed, method="stlora" if args.stlora else "gstlora",
                                  model=str(args.model), steps=args.steps, guidance=args.guidance,
                                  cells=[SweepCell(alphas=alphas, image=cell_name(alphas)) for alphas in cells]))
        write_explorer(folder)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    args.device = check_device(args.device)
    import torch  # the slow imports, after every argument is checked

    from slideredit.image import load_image, to_rgb
    from slideredit.training.distributed import cleanup_distributed, setup_distributed

    source = to_rgb(load_image(args.image))  # a bad image fails before the model loads
    ranks = setup_distributed()  # torchrun's processes (NCCL on GPUs, gloo on CPUs), or this one alone
    try:
        return edit_or_sweep(args, source, ranks)
    finally:
        cleanup_distributed(ranks)


def edit_or_sweep(args: argparse.Namespace, source, ranks: Distributed) -> Path:
    """Load the pipeline and its adapter on this rank's device, then make the edit or the sweep."""
    from slideredit.evaluation.sharding import rank_device
    from slideredit.grids import save_image
    from slideredit.pipelines import SliderEditFluxKontextPipeline

    dtype = resolve_dtype(args.dtype, args.device)
    with ranks.main_process_first():  # a hub download happens once, on rank 0; the others read its cache
        pipe = SliderEditFluxKontextPipeline.from_pretrained(args.model, torch_dtype=dtype,
                                                             device=rank_device(args.device, ranks),
                                                             offload=args.offload, quantize=args.quantize,
                                                             t5_quantize=args.t5_quantize)
    if pipe.device.type == "cuda":
        print(device_memory_report(pipe), file=sys.stderr)
    auto_resize = pipe.defaults.auto_resize if args.auto_resize is None else args.auto_resize
    notice = resize_notice(source.width, source.height, auto_resize)
    if notice:
        print(notice, file=sys.stderr)
    if args.stlora:
        pipe.load_stlora(args.stlora)
    elif args.gstlora:
        pipe.load_gstlora(args.gstlora)
    if args.compile:
        pipe.compile()  # after the adapters are on: their stacks are part of the compiled blocks' inputs
    if args.sweep:
        out = run_sweep(pipe, args, source, ranks)
    else:
        image, = edit(pipe, args, source, None if args.slider_alphas is None else [tuple(args.slider_alphas)])
        out = save_image(image, args.out)
        print(f"wrote {out} ({image.width}x{image.height})")
    if pipe.device.type == "cuda":
        print(device_memory_report(pipe) + " (after the edit)", file=sys.stderr)
    return out


def cli() -> None:
    """`python infer.py` and the `slideredit-infer` command: main() with one-line errors."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill unwinds too: no half-written file is left
    try:
        main()
    except (ValueError, TypeError, OSError) as err:  # CheckpointError is a ValueError: one readable line
        raise SystemExit(f"error: {err}") from None
    except KeyboardInterrupt:
        print("interrupted: --out is left as it was; a sweep keeps the cells it made in the hidden folder beside "
              "--out (.NAME.partial), and the same command again makes only the others", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    cli()
