"""The toy model folder's README.md, filled in from the recorded run.

The text is the template model_card.md (with model_card_sliders.md as its step 4 once the sliders are
trained), filled by `str.format_map`: `{cfg.<field>}` is a recipe setting (a flag of recipe.py),
`{flux.<field>}` and `{autoencoder.<field>}` the toy architecture (models.py), `{metrics[...]}` the edits
measured through the pipeline (edit_evaluation.py), and the other names are what `card_values` computes.
"""
from __future__ import annotations

import json
import textwrap
from importlib import resources

import torch

from ..transformer import Flux
from . import models
from .demo_grid import FIDELITY_GOALS
from .recipe_common import RecipeConfig, load_checkpoint, recipe_command
from .shapes import IMAGE_SIZE, INDEPENDENT_EDITS

# The measured-edits table: one row per label, from the metrics entry it names (edit_evaluation.py).
EDIT_TABLE_ROWS = (
    ("all edited attributes", "edited"), ("colour edits", "edited_color"), ("size edits", "edited_size"),
    ("brightness edits", "edited_brightness"), ("in one-edit prompts", "edited_one_edit_prompts"),
    ("in two-edit prompts", "edited_two_edit_prompts"), ("colour, in two-edit prompts", "two_edit_color"),
    ("size, in two-edit prompts", "two_edit_size"), ("brightness, in two-edit prompts", "two_edit_brightness"),
)


def write_model_card(cfg: RecipeConfig, metrics: dict, sliders: dict[str, dict] | None = None,
                     demo: dict | None = None) -> None:
    """README.md of the model folder, from the recorded run: sizes, command, times, losses, accuracy,
    and the sliders once they are trained (with `demo`, demo_grid.demo_grid_fidelity's reading of the
    default demo's grid)."""
    (cfg.out / "README.md").write_text(
        _template("model_card.md").format_map(card_values(cfg, metrics, sliders, demo)))


def card_values(cfg: RecipeConfig, metrics: dict, sliders: dict[str, dict] | None, demo: dict | None = None) -> dict:
    """The template's placeholders: the architecture, then what the run left in cfg.workdir and cfg.out."""
    ae_runs = [load_checkpoint(cfg.workdir / name) for name in ("ae.pt", "ae_decoder.pt")]  # the two phases
    flux_run = load_checkpoint(cfg.workdir / "flux.pt")
    pool = load_checkpoint(cfg.workdir / "pool.pt")
    encoders = models.build_text_encoders(cfg.seed)
    history = flux_run["history"]
    return {
        "cfg": cfg, "flux": models.FLUX_PARAMS, "autoencoder": models.AE_PARAMS, "t5": models.T5_CONFIG,
        "image_size": IMAGE_SIZE, "max_sequence_length": models.MAX_SEQUENCE_LENGTH,
        "transformer_file": models.TRANSFORMER_FILE, "ae_file": models.AE_FILE,
        "flux_parameters": _count(flux_like()), "autoencoder_parameters": _count(models.build_autoencoder()),
        "clip_parameters": _count(encoders.clip), "t5_parameters": _count(encoders.t5),
        "folder_kib": sum(f.stat().st_size for f in cfg.out.rglob("*") if f.is_file()) / 1024,
        "command": recipe_command(cfg),
        "autoencoder_minutes": sum(run["seconds"] for run in ae_runs) / 60,
        "autoencoder_report": json.loads((cfg.workdir / "autoencoder.json").read_text()),
        "pool_pairs": len(pool["pair_source"]), "pool_prompts": len(pool["texts"]),
        "transformer_minutes": flux_run["seconds"] / 60,
        "identity_term": "" if not cfg.copy_loss_weight else (
            f", the tokens it leaves alone weighted 1 + {cfg.copy_loss_weight:g} t^2 (an identity term: t^2 times the "
            "velocity error is the error of the clean latent the model implies, so untouched shapes must come out as "
            "the source's)"),
        "losses": ", ".join(f"{loss:.3f} (step {step})" for step, loss in history[:: max(1, len(history) // 6)]),
        "sliders": sliders_section(cfg, sliders, demo),
        "metrics": metrics, "scenes_per_edit_count": metrics["scenes"] // 2, "edit_table": edit_table(metrics),
    }


def sliders_section(cfg: RecipeConfig, sliders: dict[str, dict] | None, demo: dict | None = None) -> str:
    """Step 4 of the model card: the sliders trained on the base model (once they are), after a blank line."""
    if not sliders:
        return ""
    fidelity = "" if demo is None else "\n" + textwrap.fill(
        f"The default demo's 5 x 5 grid (`python infer.py`, read by the recipe with `slideredit/toy/demo_grid.py`):"
        f" image error median {demo['image_error']['median']:.2f}, max {demo['image_error']['max']:.2f} mean |RGB|"
        f" (goal <= {FIDELITY_GOALS['image_error']:g}); the worse shape's core colour median"
        f" {demo['color_error']['median']:.1f}, max {demo['color_error']['max']:.1f} RGB off the ideal"
        f" (goal <= {FIDELITY_GOALS['color_error']:g}); {demo['cells_meeting_goals']} of {len(demo['cells'])}"
        " cells meet both goals.", 110, initial_indent="   ", subsequent_indent="   ")

    def run(r: dict) -> str:
        return "loss not recorded" if r["loss"] is None else f"Final loss {r['loss']:.4f}, {r['minutes']:.1f} min"

    return "\n" + _template("model_card_sliders.md").format_map({
        "cfg": cfg, "trained_steps": sliders["gstlora"]["steps"],
        "edits": ", ".join(f'"{e.instruction}"' for e in INDEPENDENT_EDITS),
        "gstlora_run": run(sliders["gstlora"]), "stlora_run": run(sliders["stlora"]), "demo_fidelity": fidelity,
    })


def edit_table(metrics: dict) -> str:
    """The rows of the measured-edits table; a row that measured nothing is left blank."""
    def row(name: str, m: dict) -> str:
        rgb, px = m.get("mean_rgb_error"), m.get("mean_size_error_px")
        if not m["count"]:
            return f"| {name} | 0 | | | | |"
        return (f"| {name} | {m['count']} | {m['accuracy']:.0%} | {m['mean_strength']:.2f} | "
                f"{'' if rgb is None else f'{rgb:.1f}'} | {'' if px is None else f'{px:.2f}'} |")

    return "\n".join(row(name, metrics[key]) for name, key in EDIT_TABLE_ROWS)


def _template(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def _count(module: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in module.parameters()):,}"


def flux_like() -> Flux:
    with torch.device("meta"):
        return Flux(models.FLUX_PARAMS)
