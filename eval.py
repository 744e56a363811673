#!/usr/bin/env python
r"""Evaluate SliderEdit sweeps: scores and distances per alpha, continuity and monotonicity per case, curves.

Sweep mode, on folders written by infer.py (see slideredit/evaluation/sweep.py for the format):

    python eval.py --sweep outputs/curly --attribute "curly hair"

Model mode: edit every case of a JSONL file at every alpha, then evaluate those sweeps:

    python eval.py --model black-forest-labs/FLUX.1-Kontext-dev --gstlora gstlora.safetensors \
        --cases cases.jsonl --alphas -1,-0.5,0,0.5,1

    cases.jsonl, one object a line: {"image": "faces/1.png", "prompt": "make the hair curly",
    "attribute": "curly hair", "subprompts": [...] (STLoRA only, optional)}

A case is one slider of one sweep: its curve is the score against that slider's alpha with every
other slider at 0 (a 2-slider STLoRA grid gives two cases; the whole grid still goes into the CSV).
Writes to --out: metrics.csv (one row per case and image), summary.json (per case and metric:
continuity, monotonicity, min, max, range; and the inputs), curves.png (one panel per metric). Each
evaluated sweep folder gets (or has updated) its explorer page, index.html, showing every cell's scores.

Scorers (--scorer): "pretrained" runs the models of --metrics (CLIP, SigLIP, BLIP, DINOv2...: hub ids or
local folders). "toy" needs no network and no model: for sweeps of the toy model (assets/toy-kontext) it
reads the edit strength of each slider's instruction with the toy world's attribute readers (metric
"toy": 0 = the source's attribute, 1 = the base edit's target, see slideredit/toy/shapes.py), the
mean strength of the prompt's other edits ("toy_others": how much the slider disturbs them) and each
image's fidelity to the ideal render of its read strengths ("toy_image_error", "toy_color_error",
"toy_position_error", "toy_size_error": 0 = faithful, see slideredit/toy/fidelity.py). "auto"
(default) picks "toy" when every sweep's model (sweep.json's "model", or --model) is a folder holding
the toy model (its flux1-toy.safetensors), else "pretrained":

    python eval.py --sweep outputs/sweep            # the toy demo's sweep, offline

Model mode on several GPUs (or CPU processes): torchrun splits the (case, alpha) cells over the ranks,
one GPU per rank; rank 0 writes every file, then scores every image as one process does (same numbers):

    torchrun --nproc_per_node 8 eval.py --model ... --cases cases.jsonl

A rerun after a kill makes only the cells the killed run did not finish (--out/sweeps/manifest.json,
removed when the evaluation is complete), with any number of processes.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from slideredit.atomic import atomic_path
from slideredit.cli import join_alphas, parse_alphas, torchrun_rank, writable_problem
from slideredit.explorer import write_explorer
from slideredit.grids import save_png
from slideredit.image import load_image, to_rgb
from slideredit.evaluation import (ArcFaceDistance, BlipItmScore, ClipScore, DinoDistance, HubUnreachableError,
                                   LpipsDistance, SiglipScore, Sweep, SweepCell, TOY_FIDELITY_TITLES, ToyEditStrength,
                                   ToyFidelity, check_hub_source,
                                   continuity_score, draw_curves, is_toy_model, monotonicity_score,
                                   other_instructions, read_sweep, write_sweep)
from slideredit.evaluation.sharding import CellManifest, digest, file_digest, from_main, rank_device, render_in_rounds
from slideredit.training.distributed import Distributed, cleanup_distributed, setup_distributed

TEXT_METRICS = ("clip", "siglip", "blip")        # scored against the case's attribute phrase
DISTANCE_METRICS = ("dino", "lpips", "arcface")  # measured against the sweep's source image
DEFAULT_METRICS = "clip,siglip,blip,dino"        # the ones that need no optional package
TOY_METRICS = ("toy", "toy_others", *TOY_FIDELITY_TITLES)  # --scorer toy: read from the toy world's attributes
MODEL_FLAGS = {"clip": "--clip-model", "siglip": "--siglip-model", "blip": "--blip-model", "dino": "--dino-model"}
TITLES = {"toy": "toy: edit strength (0 = source, 1 = edit)", "toy_others": "toy_others: the other edits' strength",
          "clip": "clip: CLIP cosine", "siglip": "siglip: SigLIP match probability",
          "blip": "blip: BLIP ITM match probability", "dino": "dino: DINOv2 distance to source",
          "lpips": "lpips: LPIPS distance to source", "arcface": "arcface: identity distance to source",
          **TOY_FIDELITY_TITLES}
MODEL_MODE_ONLY = ("model", "gstlora", "stlora", "cases", "alphas", "seed", "steps", "guidance", "dtype")
SWEEP_MODE_ONLY = ("sweep", "attribute")
MANIFEST = "manifest.json"  # in --out/sweeps: the cells made so far, while model mode runs


@dataclass
class Case:
    """One slider of one sweep, evaluated against one attribute phrase."""
    name: str
    attribute: str
    slider: int  # which entry of a cell's alphas this case sweeps
    folder: Path
    sweep: Sweep

    def on_curve(self, cell: SweepCell) -> bool:
        """The cells of this case's curve: every other slider at 0."""
        return all(a == 0 for index, a in enumerate(cell.alphas) if index != self.slider)


@dataclass
class CaseSpec:
    """One line of a cases file (model mode)."""
    image: Path
    prompt: str
    attributes: list[str]  # one per slider
    subprompts: list[str] | None


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------

def parse_metrics(text: str) -> list[str]:
    metrics = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in metrics if name not in TEXT_METRICS + DISTANCE_METRICS]
    if not metrics or unknown or len(set(metrics)) != len(metrics):
        raise argparse.ArgumentTypeError(
            f"expected distinct names from {','.join(TEXT_METRICS + DISTANCE_METRICS)}, got {text!r}")
    return metrics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--sweep", type=Path, nargs="+", metavar="DIR",
                        help="sweep folder(s) written by infer.py (sweep.json, source image, cells/)")
    source.add_argument("--model", metavar="SRC", help="model mode: FLUX.1 Kontext hub id or local folder")
    adapter = parser.add_mutually_exclusive_group()
    adapter.add_argument("--gstlora", type=Path, metavar="PATH", help="model mode: GSTLoRA weights (one slider)")
    adapter.add_argument("--stlora", type=Path, metavar="PATH",
                         help="model mode: STLoRA weights (one slider per sub-prompt)")
    parser.add_argument("--cases", type=Path, metavar="FILE",
                        help="model mode: JSONL of {image, prompt, attribute, subprompts?}; image paths are "
                             "relative to the file. With --stlora each sub-prompt's alpha is swept with the "
                             "others at 0, and attribute is a list with one phrase per sub-prompt (a string "
                             "when there is one sub-prompt; subprompts default to [prompt])")
    parser.add_argument("--alphas", type=lambda text: parse_alphas(text, minimum=2),
                        default=[-1.0, -0.5, 0.0, 0.5, 1.0],
                        help="model mode: slider values, comma-separated (default: -1,-0.5,0,0.5,1)")
    parser.add_argument("--seed", type=int, default=0, help="model mode: seed of every edit (default: 0)")
    parser.add_argument("--steps", type=int, default=28, help="model mode: denoising steps (default: 28)")
    parser.add_argument("--guidance", type=float, default=2.5, help="model mode: guidance scale (default: 2.5)")
    parser.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                        help="model mode: the pipeline's dtype; auto = bfloat16 on CUDA, float32 on CPU. "
                             "Evaluators always run in float32")
    parser.add_argument("--attribute", action="append", metavar="PHRASE",
                        help="sweep mode: the phrase text scores are measured against, e.g. 'curly hair'; "
                             "give it once per slider, in sub-prompt order (default: the sweep's prompt, "
                             "or its sub-prompts for STLoRA)")
    parser.add_argument("--scorer", choices=("auto", "toy", "pretrained"), default="auto",
                        help="toy: offline edit strength and fidelity for toy-model sweeps (metrics toy, toy_others, "
                             "toy_image_error, toy_color_error, toy_position_error, toy_size_error); "
                             "pretrained: the models of --metrics; auto: toy when every sweep was made with "
                             "the toy model, else pretrained (default: auto)")
    parser.add_argument("--metrics", type=parse_metrics, default=None,
                        help="pretrained scorer: comma-separated from clip (CLIP cosine), siglip (SigLIP match probability), "
                             "blip (BLIP ITM match probability), dino (DINOv2 CLS cosine distance to the "
                             "source), lpips (needs `pip install lpips`), arcface (face identity distance; "
                             f"needs `pip install insightface onnxruntime`) (default: {DEFAULT_METRICS})")
    for flag, default, name in [("--clip-model", "openai/clip-vit-base-patch32", "CLIP"),
                                ("--siglip-model", "google/siglip-so400m-patch14-384", "SigLIP"),
                                ("--blip-model", "Salesforce/blip-itm-base-coco", "BLIP image-text matching"),
                                ("--dino-model", "facebook/dinov2-base", "DINOv2")]:
        parser.add_argument(flag, default=default, help=f"{name} hub id or local folder (default: {default})")
    parser.add_argument("--lpips-net", choices=("alex", "vgg"), default="alex", help="LPIPS backbone (default: alex)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device for the evaluators and the pipeline (default: cuda if available)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per evaluator forward pass (default: 16)")
    parser.add_argument("--out", type=Path, default=Path("outputs/eval"), help="output folder (default: outputs/eval)")
    args = parser.parse_args(join_alphas(sys.argv[1:] if argv is None else argv))

    model_only = {"--gstlora": args.gstlora, "--stlora": args.stlora, "--cases": args.cases}
    if args.model is None and any(value is not None for value in model_only.values()):
        parser.error("--gstlora, --stlora and --cases belong to model mode (--model), not to --sweep")
    if args.model is not None:
        if args.gstlora is None and args.stlora is None:
            parser.error("model mode needs the adapter: --gstlora PATH or --stlora PATH")
        if args.cases is None:
            parser.error("model mode needs --cases FILE")
        if args.attribute:
            parser.error("--attribute belongs to sweep mode; in model mode each case names its attribute")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.scorer == "toy" and args.metrics is not None:
        parser.error(f"--metrics chooses the pretrained scorers; --scorer toy always reports {','.join(TOY_METRICS)}")
    rank, processes = torchrun_rank()
    if processes > 1 and args.model is None:
        parser.error(f"torchrun's {processes} processes split model mode's cells (--model); --sweep only scores, "
                     "in one process: run it without torchrun")
    problem = writable_problem(args.out / "metrics.csv") if rank == 0 else None  # rank 0 alone writes
    if problem:  # found now, not after scoring everything
        parser.error(f"--out {args.out}: {problem}")
    return args


def choose_scorer(args: argparse.Namespace, models: list[tuple[str, Path | None]]) -> None:
    """Resolve --scorer auto and set args.metrics. `models`: (model, folder to resolve it from) per sweep."""
    if args.scorer == "auto":
        toy = [is_toy_model(model, folder) for model, folder in models]
        args.scorer = "toy" if all(toy) and args.metrics is None else "pretrained"
        if any(toy) and not all(toy) and args.metrics is None:
            print("eval.py: some sweeps were made with the toy model and some not; scoring all with the "
                  "pretrained models (--scorer toy scores toy sweeps offline)", file=sys.stderr)
    if args.scorer == "toy":
        args.metrics = list(TOY_METRICS)
    elif args.metrics is None:
        args.metrics = parse_metrics(DEFAULT_METRICS)


# ---------------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------------

def load_rgb(path: Path) -> Image.Image:
    return to_rgb(load_image(path))


def sweep_cases(folder: Path, sweep: Sweep, attributes: list[str] | None) -> list[Case]:
    """One case per slider of a sweep; attributes default to the prompt (one slider) or the sub-prompts."""
    if attributes is None:
        attributes = sweep.subprompts if sweep.method == "stlora" else [sweep.prompt]
    if len(attributes) != sweep.num_sliders:
        raise ValueError(f"{folder}: {len(attributes)} attribute phrase(s) given, but the sweep has "
                         f"{sweep.num_sliders} slider(s): give --attribute once per slider, in sub-prompt order")
    name = folder.resolve().name
    return [Case(name if sweep.num_sliders == 1 else f"{name}/{k + 1}", attribute, k, folder, sweep)
            for k, attribute in enumerate(attributes)]


def read_cases(path: Path, stlora: bool) -> list[CaseSpec]:
    """Parse and check a cases file; every problem names the file and line."""
    if not path.is_file():
        raise FileNotFoundError(f"cases file {path} does not exist")
    specs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err})") from None
        if not isinstance(record, dict) or not all(isinstance(record.get(key), str) for key in ("image", "prompt")):
            raise ValueError(f"{where}: expected an object with string fields 'image' and 'prompt'")
        subprompts = record.get("subprompts")
        if subprompts is not None and (not isinstance(subprompts, list) or not subprompts
                                       or not all(isinstance(text, str) and text for text in subprompts)):
            raise ValueError(f"{where}: subprompts must be a non-empty list of strings, got {subprompts!r}")
        subprompts = (subprompts or [record["prompt"]]) if stlora else None  # GSTLoRA has no sub-prompts
        attribute = record.get("attribute")
        attributes = [attribute] if isinstance(attribute, str) else attribute
        sliders = len(subprompts) if stlora else 1
        if not (isinstance(attributes, list) and len(attributes) == sliders
                and all(isinstance(a, str) for a in attributes)):
            raise ValueError(f"{where}: attribute must be a string, or a list of {sliders} strings (one per "
                             f"sub-prompt), for {sliders} slider(s); got {attribute!r}")
        image = path.parent / record["image"]
        if not image.is_file():
            raise FileNotFoundError(f"{where}: image {image} does not exist (paths are relative to the cases file)")
        specs.append(CaseSpec(image, record["prompt"], attributes, subprompts))
    if not specs:
        raise ValueError(f"cases file {path} has no cases")
    return specs


# ---------------------------------------------------------------------------------------------------
# Model mode: make the sweeps
# ---------------------------------------------------------------------------------------------------

def pipeline_class() -> type:
    try:
        from slideredit import SliderEditFluxKontextPipeline
    except ImportError:
        raise ImportError("eval.py --model needs slideredit.SliderEditFluxKontextPipeline, which this version of "
                          "slideredit does not provide yet. Evaluate folders written by infer.py with --sweep "
                          "DIR instead.") from None
    return SliderEditFluxKontextPipeline


def cell_alphas(alphas: list[float], sliders: int) -> list[tuple[float, ...]]:
    """Each slider swept alone with the others at 0 (the all-zero cell is made once)."""
    cells = [tuple(a if index == k else 0.0 for index in range(sliders)) for k in range(sliders) for a in alphas]
    return list(dict.fromkeys(cells))


def cell_name(alphas: tuple[float, ...]) -> str:
    return "cells/" + "_".join(f"{a:+.3f}" for a in alphas) + ".png"


def method_name(args: argparse.Namespace) -> str:
    return "gstlora" if args.gstlora is not None else "stlora"


def adapter_path(args: argparse.Namespace) -> Path:
    return args.gstlora if args.gstlora is not None else args.stlora


def manifest_path(out: Path) -> Path:
    return out / "sweeps" / MANIFEST


def generation_dtype(args: argparse.Namespace) -> torch.dtype:
    return {"auto": torch.bfloat16 if str(args.device).startswith("cuda") else torch.float32,
            "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]


def cell_keys(args: argparse.Namespace, specs: list[CaseSpec], cells: list[tuple[int, tuple[float, ...]]]) -> dict:
    """Per cell (case index, alphas), the key of everything its image is made from (CellManifest)."""
    settings = {"model": args.model, "adapter": file_digest(adapter_path(args)), "method": method_name(args),
                "dtype": str(generation_dtype(args)), "seed": args.seed, "steps": args.steps, "guidance": args.guidance}
    images = {index: file_digest(spec.image) for index, spec in enumerate(specs)}
    return {(index, alphas): digest({**settings, "image": images[index], "prompt": specs[index].prompt,
                                     "subprompts": specs[index].subprompts, "alphas": list(alphas)})
            for index, alphas in cells}


def load_pipeline(args: argparse.Namespace, ranks: Distributed):
    with ranks.main_process_first():  # a hub download happens once, on rank 0; the others read its cache
        pipe = pipeline_class().from_pretrained(args.model, torch_dtype=generation_dtype(args),
                                                device=rank_device(args.device, ranks))
    if args.gstlora is not None:
        pipe.load_gstlora(args.gstlora)
    else:
        pipe.load_stlora(args.stlora)
    return pipe


def generate_sweeps(args: argparse.Namespace, specs: list[CaseSpec], ranks: Distributed) -> list[Path]:
    """Edit every case at every alpha with the slider pipeline; write one sweep folder per case.

    Under torchrun each rank makes its share of the cells and rank 0 writes them all (sharding.py). Each
    cell is written atomically and recorded in the manifest: a rerun after a kill makes only the others.
    """
    folders = [args.out / "sweeps" / f"case{index:03d}" for index in range(len(specs))]
    cells = [(index, alphas) for index, spec in enumerate(specs)
             for alphas in cell_alphas(args.alphas, len(spec.subprompts) if spec.subprompts else 1)]
    todo = None
    if ranks.is_main:
        for folder, spec in zip(folders, specs):
            (folder / "cells").mkdir(parents=True, exist_ok=True)
            save_png(load_rgb(spec.image), folder / "source.png")
        manifest, keys = CellManifest(manifest_path(args.out)), cell_keys(args, specs, cells)
        todo = [(index, alphas) for index, alphas in cells
                if not manifest.is_done(f"{folders[index].name}/{cell_name(alphas)}", keys[index, alphas])]
        if len(todo) < len(cells):
            print(f"eval.py: {len(cells) - len(todo)} of {len(cells)} cells were made by an interrupted run "
                  f"({manifest.path}); making the other {len(todo)}", file=sys.stderr)
    todo = from_main(todo, ranks)
    if todo:
        pipe = load_pipeline(args, ranks)
        sources = {}  # case index -> its source image, read once per rank

        def render(cell: tuple[int, tuple[float, ...]]) -> Image.Image:
            index, alphas = cell
            spec = specs[index]
            if index not in sources:
                sources[index] = load_rgb(spec.image)
            source = sources[index]
            print(f"case {index}: alphas {list(alphas)}", file=sys.stderr)
            sliders = ({"slider_alpha": alphas[0]} if args.gstlora is not None else
                       {"subprompts_list": spec.subprompts, "slider_alpha_list": list(alphas)})
            return pipe(image=source, prompt=spec.prompt, generator=torch.Generator().manual_seed(args.seed),
                        num_inference_steps=args.steps, guidance_scale=args.guidance, **sliders).images[0]

        for (index, alphas), image in render_in_rounds(todo, render, ranks):  # rank 0 only: the others get none
            save_png(image, folders[index] / cell_name(alphas))
            manifest.record(f"{folders[index].name}/{cell_name(alphas)}", keys[index, alphas])
    if ranks.is_main:
        for index, (folder, spec) in enumerate(zip(folders, specs)):
            made = [SweepCell(alphas, cell_name(alphas)) for case, alphas in cells if case == index]
            write_sweep(folder, Sweep(source_image="source.png", prompt=spec.prompt, subprompts=spec.subprompts,
                                      seed=args.seed, method=method_name(args),
                                      model=str(args.model), steps=args.steps, guidance=args.guidance, cells=made))
    return folders


# ---------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------

def build_evaluators(args: argparse.Namespace) -> dict:
    if args.scorer == "toy":  # one reader for both toy metrics (see toy_scores)
        return dict.fromkeys(TOY_METRICS, ToyEditStrength())
    makers = {
        "clip": lambda: ClipScore(args.clip_model, args.device, args.batch_size),
        "siglip": lambda: SiglipScore(args.siglip_model, args.device, args.batch_size),
        "blip": lambda: BlipItmScore(args.blip_model, args.device, args.batch_size),
        "dino": lambda: DinoDistance(args.dino_model, args.device, args.batch_size),
        "lpips": lambda: LpipsDistance(args.lpips_net, args.device, args.batch_size),
        "arcface": lambda: ArcFaceDistance(device=args.device),
    }
    evaluators = {}
    for name in args.metrics:
        try:
            evaluators[name] = makers[name]()
        except HubUnreachableError as err:  # one line: what was fetched, and how to go on without the hub
            raise HubUnreachableError(f"{err}; pass a local model folder with {MODEL_FLAGS[name]}, leave '{name}' "
                                      "out of --metrics, or score a toy-model sweep offline with --scorer toy") from None
    return evaluators


def evaluate_sweep(cases: list[Case], evaluators: dict) -> list[list[dict]]:
    """metrics.csv rows for the cases of one sweep: for each case, one row per cell of the sweep."""
    folder, sweep = cases[0].folder, cases[0].sweep
    source = load_rgb(folder / sweep.source_image)
    images = [load_rgb(folder / cell.image) for cell in sweep.cells]
    print(f"{folder}: {len(images)} images", file=sys.stderr)
    distances = {name: fn(images, source).tolist() for name, fn in evaluators.items() if name in DISTANCE_METRICS}
    per_case = []
    for case in cases:
        scores = {name: fn(images, case.attribute).tolist() for name, fn in evaluators.items() if name in TEXT_METRICS}
        if "toy" in evaluators:
            scores |= toy_scores(case.sweep.prompt, case.attribute, images, source, evaluators["toy"],
                                 where=f"{case.folder}: case {case.name}: the toy scorer cannot read this sweep")
        per_case.append([{"case": case.name, "attribute": case.attribute, "alpha": cell.alphas[case.slider],
                          "alphas": " ".join(f"{a:g}" for a in cell.alphas), "image": str(folder / cell.image),
                          **{name: (scores | distances)[name][index] for name in evaluators}}
                         for index, cell in enumerate(sweep.cells)])
    return per_case


def toy_scores(prompt: str, attribute: str, images: list[Image.Image], source: Image.Image, scorer: ToyEditStrength,
               where: str) -> dict:
    """toy: the strength of the attribute's instruction; toy_others: of the prompt's other edits (NaN if none);
    the fidelity metrics of the whole prompt (ToyFidelity). What the toy readers cannot read is a ValueError
    starting with `where`."""
    try:
        own = scorer(images, source, attribute).tolist()
        others = other_instructions(prompt, attribute)
        rest = scorer(images, source, " and ".join(others)).tolist() if others else [math.nan] * len(images)
        fidelity = {name: values.tolist() for name, values in ToyFidelity()(images, source, prompt).items()}
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    return {"toy": own, "toy_others": rest, **fidelity}


def check_toy_cases(specs: list[CaseSpec], cases_file: Path) -> None:
    """Model mode with the toy scorer: every case's prompt, attributes and source image must be the toy
    world's. Scoring the source against itself runs the same readers as the real scoring, before any edit
    is generated (a bad line found after the sweeps would leave them half written)."""
    scorer = ToyEditStrength()
    for index, spec in enumerate(specs):
        source = load_rgb(spec.image)
        for attribute in spec.attributes:
            toy_scores(spec.prompt, attribute, [source], source, scorer,
                       where=f"{cases_file}: case {index} ({spec.image.name}): the toy scorer cannot read it")


def summarise(case: Case, rows: list[dict], metrics: list[str]) -> dict:
    """Continuity, monotonicity, min, max and range of every metric along the case's curve.

    `rows` are the case's rows from evaluate_sweep, one per cell in the sweep's order.
    """
    curve = [row for row, cell in zip(rows, case.sweep.cells) if case.on_curve(cell)]
    curve.sort(key=lambda row: row["alpha"])
    if len(curve) < 2:
        raise ValueError(f"{case.folder}: case {case.name} has {len(curve)} cell(s) with the other sliders at 0; "
                         "a curve needs at least 2 alphas")
    alphas = [row["alpha"] for row in curve]
    sweep = case.sweep
    summary = {"case": case.name, "attribute": case.attribute, "sweep": str(case.folder), "prompt": sweep.prompt,
               "subprompts": sweep.subprompts, "slider": case.slider + 1,
               "generation": {"method": sweep.method, "model": sweep.model, "seed": sweep.seed, "steps": sweep.steps,
                              "guidance": sweep.guidance},
               "alphas": alphas, "metrics": {}}
    for name in metrics:
        values = [row[name] for row in curve]
        finite = [v for v in values if math.isfinite(v)]
        low, high = (min(finite), max(finite)) if finite else (math.nan, math.nan)
        summary["metrics"][name] = {"continuity": continuity_score(values),
                                    "monotonicity": monotonicity_score(alphas, values),
                                    "min": low, "max": high, "range": high - low, "values": values}
    return summary


def cell_scores(cases: list[Case], per_case_rows: list[list[dict]], metrics: list[str]) -> dict[str, dict]:
    """For the explorer page: each cell's scores, a text score once per case ("clip (curly hair)"); a score
    of the image alone (a distance, a toy fidelity metric) once."""
    sweep, scores = cases[0].sweep, {}
    for case, rows in zip(cases, per_case_rows):
        for cell, row in zip(sweep.cells, rows):
            for name in metrics:
                per_image = name in DISTANCE_METRICS or name in TOY_FIDELITY_TITLES
                label = name if per_image else f"{name} ({case.attribute})"
                scores.setdefault(cell.image, {})[label] = row[name]
    return scores


def _json_safe(value: object) -> object:
    """NaN (a missing face, an undefined correlation) is not JSON: write null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_outputs(out: Path, args: argparse.Namespace, rows: list[dict], summaries: list[dict]) -> None:
    """metrics.csv, summary.json and curves.png, each written atomically."""
    with atomic_path(out / "metrics.csv") as temp, open(temp, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=["case", "attribute", "alpha", "alphas", "image", *args.metrics])
        writer.writeheader()
        writer.writerows(rows)
    other_mode = SWEEP_MODE_ONLY if args.model is not None else MODEL_MODE_ONLY
    inputs = {key: value for key, value in vars(args).items() if key not in other_mode and value is not None}
    with atomic_path(out / "summary.json") as temp:
        temp.write_text(json.dumps(_json_safe({"inputs": inputs, "cases": summaries}), indent=2) + "\n", encoding="utf-8")
    panels = {TITLES[name]: {f"{s['case']}: {s['attribute']}": (s["alphas"], s["metrics"][name]["values"])
                             for s in summaries}
              for name in args.metrics}
    with atomic_path(out / "curves.png") as temp:
        draw_curves(panels).save(temp, format="PNG")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.model is not None:  # cheap checks before any model is loaded
        specs = read_cases(args.cases, stlora=args.stlora is not None)
        pipeline_class()
        if not adapter_path(args).exists():
            raise FileNotFoundError(f"adapter weights {adapter_path(args)} do not exist")
        choose_scorer(args, [(args.model, None)])
        if args.scorer == "toy":
            check_toy_cases(specs, args.cases)
        check_hub_source(args.model, "FLUX.1 Kontext (--model)", filename="model_index.json")
        ranks = setup_distributed()  # torchrun's processes (NCCL on GPUs, gloo on CPUs), or this one alone
        try:
            evaluators = build_evaluators(args) if ranks.is_main else {}
            folders = generate_sweeps(args, specs, ranks)
        finally:
            cleanup_distributed(ranks)
        if not ranks.is_main:
            return 0  # rank 0 scores every image, as one process does: the numbers do not depend on the split
        groups = [sweep_cases(folder, read_sweep(folder), spec.attributes) for folder, spec in zip(folders, specs)]
    else:
        names = [folder.resolve().name for folder in args.sweep]
        if len(set(names)) != len(names):
            raise ValueError(f"--sweep folders must have distinct names (case names come from them), got {names}")
        groups = [sweep_cases(folder, read_sweep(folder), args.attribute) for folder in args.sweep]
        choose_scorer(args, [(cases[0].sweep.model, cases[0].folder) for cases in groups])
        evaluators = build_evaluators(args)

    rows, summaries, pages = [], [], {}
    for cases in groups:  # the cases of one sweep share its images
        per_case = evaluate_sweep(cases, evaluators)
        for case, case_rows in zip(cases, per_case):
            rows += case_rows
            summaries.append(summarise(case, case_rows, args.metrics))
        pages[cases[0].folder] = cell_scores(cases, per_case, args.metrics)
    write_outputs(args.out, args, rows, summaries)
    explorers = []
    for folder, scores in pages.items():
        problem = writable_problem(folder / "index.html")
        if problem:  # e.g. a sweep shared read-only: its scores are in --out all the same
            print(f"eval.py: note: {folder / 'index.html'} is not updated: {problem}", file=sys.stderr)
        else:
            explorers.append(write_explorer(folder, scores))
    if args.model is not None:  # complete: a rerun makes every cell again, as a first run does
        manifest_path(args.out).unlink(missing_ok=True)
    pages_text = f" and the explorer page(s) {', '.join(map(str, explorers))}" if explorers else ""
    print(f"wrote {args.out / 'metrics.csv'}, {args.out / 'summary.json'}, {args.out / 'curves.png'}{pages_text}",
          file=sys.stderr)
    return 0


def cli() -> None:
    """`python eval.py` and the `slideredit-eval` command: main() with one-line errors."""
    try:
        sys.exit(main())
    except (ValueError, TypeError, OSError, ImportError) as err:  # CheckpointError is a ValueError
        print(f"eval.py: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
