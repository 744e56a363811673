"""The toy world's sliders: GSTLoRA and STLoRA (PPS) trained with train.py's trainer on the toy base model.

    python -m slideredit.toy.slider_recipe --model runs/toy-kontext --work outputs/toy-sliders-work

Writes the training data (slider_data.py) to `<work>/data`, trains both methods into `<work>/<method>`
(a stopped recipe continues from the last checkpoint when run again) and puts the final adapters in
`<model>/sliders/gstlora/` and `<model>/sliders/stlora/`, each with a `train_config.yaml` that retrains
it with `python train.py --config ...` after `python -m slideredit.toy.slider_data` has written the
data where that config reads it (data/toy-sliders, relative to the repository root). The shipped model,
assets/toy-kontext (tracked in git), gets new sliders only with --replace-shipped.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import yaml

from ..training import TrainConfig, train
from .models import TRANSFORMER_FILE
from .shapes import INDEPENDENT_EDITS, NEUTRAL_PROMPT
from .slider_data import DEFAULT_OUT, SCENES, write_slider_data

SHIPPED_MODEL = Path(__file__).resolve().parents[2] / "assets" / "toy-kontext"  # the demo's, tracked in git
DEFAULT_MODEL = Path("runs/toy-kontext")  # where `python -m slideredit.toy.recipe` writes (git-ignored)
SHIPPED_OUTPUT_DIR = Path("outputs/toy-sliders-work")  # where the shipped configs train
ADAPTER_FILE = {"gstlora": "pytorch_lora_weights.safetensors", "stlora": "selective_lora.safetensors"}
COMMON = dict(resolution=128, lora_rank=16, learning_rate=1e-3, train_batch_size=8, max_train_steps=800,
              checkpointing_steps=100, checkpoints_total_limit=1, validation_steps=200,
              validation_lora_scales=[-1.0, 0.0, 1.0], validation_num_inference_steps=12,
              mixed_precision="no", gradient_checkpointing=False, guidance_scale=2.5, seed=0, logging_steps=20)


def is_shipped_model(folder: Path) -> bool:
    return folder.resolve() == SHIPPED_MODEL


def check_not_shipped(parser: argparse.ArgumentParser, flag: str, folder: Path, replace_shipped: bool) -> None:
    """The shipped toy model is rewritten only with --replace-shipped: a command copied from the docs
    must not overwrite the repository's tracked files."""
    if is_shipped_model(folder) and not replace_shipped:
        parser.error(f"{flag} {folder} is the shipped toy model (tracked in git), which this would overwrite: give "
                     f"another folder (default {DEFAULT_MODEL}), or add --replace-shipped to retrain it in place")


def slider_configs(model: Path, data: Path, work: Path) -> dict[str, dict]:
    """The two training configs (plain dicts of TrainConfig fields)."""
    singles = [edit.instruction for edit in INDEPENDENT_EDITS]
    return {
        "gstlora": dict(COMMON, method="gstlora", pretrained_model_name_or_path=str(model), dataset_name=str(data),
                        image_column="file_name", instruction_column="instruction", teacher_prompt=NEUTRAL_PROMPT,
                        validation_prompts=[singles[0]], output_dir=str(work / "gstlora")),
        "stlora": dict(COMMON, method="stlora", pretrained_model_name_or_path=str(model),
                       images_dataset_path=str(data / "images"), training_single_edit_prompts=singles,
                       max_num_instructions_per_prompt=2, validation_prompts=[f"{singles[0]} and {singles[1]}"],
                       output_dir=str(work / "stlora")),
    }


def shipped_config(model: Path, method: str, scenes: int = SCENES, steps: int | None = None) -> str:
    """The `train_config.yaml` shipped beside an adapter: the config it was trained with, reading the
    data where slider_data.py writes it by default and training into outputs/, so that it runs as is
    from the repository root."""
    fields = slider_configs(model, DEFAULT_OUT, SHIPPED_OUTPUT_DIR)[method]
    if steps is not None:
        fields["max_train_steps"] = steps
    config_path = model / "sliders" / method / "train_config.yaml"
    header = (f"# The toy {'GSTLoRA' if method == 'gstlora' else 'STLoRA'} slider's training config "
              "(written by python -m slideredit.toy.slider_recipe).\n"
              "# Relative paths are relative to the directory train.py runs from: the repository root. Retrain:\n"
              f"#   python -m slideredit.toy.slider_data --out {DEFAULT_OUT} --scenes {scenes}\n"
              f"#   python train.py --config {config_path}\n")
    return header + yaml.safe_dump(TrainConfig(**fields).to_dict(), sort_keys=False)


def train_sliders(model: Path, work: Path, scenes: int = SCENES, steps: int | None = None,
                  methods: tuple[str, ...] = ("gstlora", "stlora")) -> dict[str, dict]:
    """Train each method; returns {method: {"steps", "loss", "minutes"}} (the model card quotes them)."""
    data = write_slider_data(work / "data", scenes)
    results = {}
    for method, fields in slider_configs(model, data, work).items():
        if method not in methods:
            continue
        if steps is not None:
            fields["max_train_steps"] = steps
        config = TrainConfig(**fields, resume_from_checkpoint="latest")  # a stopped recipe continues
        (work / f"{method}.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        t0 = time.time()
        result = train(config)
        # A run resumed after its last step trains nothing and has no loss: its record says what it was.
        record = work / method / "result.json"
        if result.loss is not None:
            results[method] = {"steps": result.step, "loss": result.loss, "minutes": (time.time() - t0) / 60}
            record.write_text(json.dumps(results[method]) + "\n")
        else:
            results[method] = (json.loads(record.read_text()) if record.is_file()
                               else {"steps": result.step, "loss": None, "minutes": None})
        target = model / "sliders" / method
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(result.output_dir) / ADAPTER_FILE[method], target / ADAPTER_FILE[method])
        (target / "train_config.yaml").write_text(shipped_config(model, method, scenes, steps))
        loss = "n/a" if results[method]["loss"] is None else f"{results[method]['loss']:.4g}"
        print(f"{method}: {result.step} steps, final loss {loss} -> {target / ADAPTER_FILE[method]}")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help="the trained toy base model folder; the sliders go into its sliders/ (default: "
                             "%(default)s, what python -m slideredit.toy.recipe writes)")
    parser.add_argument("--replace-shipped", action="store_true",
                        help="allow --model to be the shipped model, assets/toy-kontext (tracked in git)")
    parser.add_argument("--work", type=Path, default=Path("outputs/toy-sliders-work"),
                        help="training data, runs and logs (default: %(default)s)")
    parser.add_argument("--scenes", type=int, default=SCENES,
                        help="source scenes for slider training (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=None,
                        help="override max_train_steps for both methods (default: the configs' "
                             f"{COMMON['max_train_steps']})")
    parser.add_argument("--methods", nargs="+", default=["gstlora", "stlora"], choices=["gstlora", "stlora"],
                        help="which sliders to train (default: both)")
    args = parser.parse_args(argv)
    if not (args.model / TRANSFORMER_FILE).is_file():
        parser.error(f"--model {args.model}: no toy model there (no {TRANSFORMER_FILE}); "
                     "python -m slideredit.toy.recipe trains one")
    check_not_shipped(parser, "--model", args.model, args.replace_shipped)
    train_sliders(args.model, args.work, args.scenes, args.steps, tuple(args.methods))


if __name__ == "__main__":
    main()
