"""Train a SliderEdit adapter (GSTLoRA or STLoRA) on FLUX.1 Kontext [dev] by self-distillation.

    python train.py --config gstlora_hqedit.yaml
    python train.py --config stlora_faces.yaml --max_train_steps 10 --learning_rate 1e-4
    python train.py --config stlora_faces.yaml --resume latest      # continue a run that was stopped
    python train.py --config stlora_faces.yaml --overwrite          # replace the earlier run in output_dir
    torchrun --nproc_per_node 8 train.py --config gstlora_hqedit.yaml
    torchrun --nproc_per_node 4 train.py --config gstlora_hqedit.yaml --sharding fsdp   # each GPU holds 1/4

A fresh run refuses an output_dir holding an earlier run's checkpoints, final adapter or validation
grids: --resume latest continues it, --overwrite removes what a run writes there (checkpoint-N/, the
adapter, config.yaml, train.log, validation/step-N.png) and nothing else. Relative paths in the
config are relative to the directory train.py runs from. Ctrl-C stops the run; --resume latest
continues from its last checkpoint.

Every field of the YAML config can be given on the command line (`--field value`; lists take several
values: `--validation_lora_scales -1 0 1`), and the command line wins. See slideredit/training/config.py
for the fields and their defaults.
"""
from __future__ import annotations

# Only the standard library here: --help, argument errors and a Ctrl-C during startup must not wait for
# (or interrupt) the import of torch and transformers, which comes after the arguments are checked.
import argparse
import logging
import os
import sys
import typing
from dataclasses import MISSING, fields
from pathlib import Path

INTERRUPTED = 130  # the exit status of a program stopped by Ctrl-C (128 + SIGINT)


def build_parser() -> argparse.ArgumentParser:
    from slideredit.training.config import TrainConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)  # a typo must not silently set another field
    parser.add_argument("--config", default=None, help="the YAML config file (the release's field names)")
    parser.add_argument("--resume", dest="resume_from_checkpoint", default=argparse.SUPPRESS, metavar="latest|PATH",
                        help="'latest' or a checkpoint-N folder (same as --resume_from_checkpoint)")
    parser.add_argument("--overwrite", action="store_true",
                        help="remove an earlier run's checkpoints, adapter, config.yaml, train.log and validation "
                             "grids from output_dir first (other files there are kept)")
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        default = f.default if f.default is not MISSING else f.default_factory()
        nargs = "*" if typing.get_origin(hints[f.name]) is list else "?" if hints[f.name] is bool else None
        # Values stay strings here: the config coerces them to the field's type, with clear errors.
        parser.add_argument(f"--{f.name}", nargs=nargs, const="true" if nargs == "?" else None,
                            default=argparse.SUPPRESS, metavar="VALUE", help=f"(default: {default!r})")
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, bool]:
    """-> (the config: file, then command-line fields; whether to --overwrite)."""
    from slideredit.training.config import did_you_mean, load_config

    parser = build_parser()
    known, unknown = parser.parse_known_args(argv)
    if unknown:  # as argparse says it, with the closest flag for each mistyped one
        flags = list(parser._option_string_actions)
        parser.error("unrecognized arguments: " + " ".join(
            word + did_you_mean(word.split("=")[0], flags) if word.startswith("--") else word for word in unknown))
    args = vars(known)
    path, overwrite = args.pop("config"), args.pop("overwrite")
    return load_config(path, overrides=args), overwrite


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    return parse_args(argv)[0]


def interrupted_message(config: TrainConfig) -> str:
    from slideredit.training.checkpoints import checkpoints

    found = checkpoints(config.output_dir)
    if not found:
        return (f"interrupted: no checkpoint was written yet (the first comes at step {config.checkpointing_steps}), "
                "so there is nothing to resume; run the same command again to start over")
    step, folder = found[-1]
    return (f"interrupted: the last checkpoint is {folder} (step {step}); --resume latest continues from it: "
            f"python train.py --config {Path(config.output_dir) / 'config.yaml'} --resume latest")


def main(argv: list[str] | None = None) -> TrainResult:
    config, overwrite = parse_args(argv)
    main_process = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    from slideredit.training import train  # torch and transformers: seconds

    try:
        return train(config, overwrite=overwrite)
    except KeyboardInterrupt:  # Ctrl-C: one line saying how to continue, not a traceback
        if main_process:
            print(interrupted_message(config), file=sys.stderr)
        raise SystemExit(INTERRUPTED) from None


def cli() -> None:
    """`python train.py` and the `slideredit-train` command: main() with one-line errors."""
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C before train() started (main handles it from there on)
        print("interrupted before training started: nothing was written", file=sys.stderr)
        raise SystemExit(INTERRUPTED) from None
    except (ValueError, TypeError, OSError, FloatingPointError) as err:  # config, data, checkpoint, NaN: one line
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    cli()
