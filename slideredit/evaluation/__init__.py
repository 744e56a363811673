"""Evaluation of slider sweeps: text-image scores, distances to the source, continuity and monotonicity.

    scores.py      ClipScore, SiglipScore, BlipItmScore: (images, texts) -> (N,)
    distances.py   DinoDistance, LpipsDistance (optional `lpips`), ArcFaceDistance (optional `insightface`):
                   (images, sources) -> (N,)
    continuity.py  continuity_score (the release's chi^2 measure), monotonicity_score (Spearman)
    toy.py         ToyEditStrength: (images, source, toy instruction) -> (N,), offline, for toy-model sweeps
                   ToyFidelity: (images, source, toy prompt) -> {metric: (N,)}, the images against the ideal render
    sweep.py       the sweep folder format shared with infer.py: read_sweep, write_sweep
    plot.py        draw_curves: slider-response curves with PIL
    release.py     the SliderEdit release's evaluation API (CLIPEvaluator, ..., chi_square_1d), over the above
    sharding.py    eval.py's and infer.py's cells split over torchrun's ranks; a killed evaluation's manifest
"""
from .continuity import average_ranks, continuity_score, monotonicity_score, spearman
from .distances import ArcFaceDistance, DinoDistance, LpipsDistance
from .loading import EvaluatorLoadError, HubUnreachableError, MissingExtraError, check_hub_source
from .plot import draw_curves
from .scores import BlipItmScore, ClipScore, SiglipScore
from .sweep import Sweep, SweepCell, SweepFormatError, read_sweep, write_sweep
from .toy import TOY_FIDELITY_TITLES, ToyEditStrength, ToyFidelity, is_toy_model, other_instructions, read_source_scene

__all__ = [
    "ArcFaceDistance", "BlipItmScore", "ClipScore", "DinoDistance", "EvaluatorLoadError", "HubUnreachableError",
    "LpipsDistance", "MissingExtraError", "SiglipScore", "Sweep", "SweepCell", "SweepFormatError", "ToyEditStrength",
    "TOY_FIDELITY_TITLES", "ToyFidelity",
    "average_ranks", "check_hub_source", "continuity_score", "draw_curves", "is_toy_model", "monotonicity_score",
    "other_instructions", "read_source_scene", "read_sweep", "spearman", "write_sweep",
]
