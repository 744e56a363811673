"""Train a SliderEdit adapter (GSTLoRA or STLoRA) on FLUX.1 Kontext [dev] by self-distillation.

    python train.py --config gstlora_hqedit.yaml
    python train.py --config stlora_faces.yaml --max_train_steps 10 --learning_rate 1e-4
    python train.py --config stlora_faces.yaml --resume latest
    torchrun --nproc_per_node 8 train.py --config gstlora_hqedit.yaml

Every field of the YAML config can be given on the command line (`--field value`; lists take several
values: `--validation_lora_scales -1 0 1`), and the command line wins. See slideredit/training/config.py
for the fields and their defaults.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import typing
from dataclasses import MISSING, fields

from slideredit.training import TrainConfig, TrainResult, load_config, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)  # a typo must not silently set another field
    parser.add_argument("--config", default=None, help="the YAML config file (the release's field names)")
    parser.add_argument("--resume", dest="resume_from_checkpoint", default=argparse.SUPPRESS, metavar="latest|PATH",
                        help="'latest' or a checkpoint-N folder (same as --resume_from_checkpoint)")
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        default = f.default if f.default is not MISSING else f.default_factory()
        nargs = "*" if typing.get_origin(hints[f.name]) is list else "?" if hints[f.name] is bool else None
        # Values stay strings here: the config coerces them to the field's type, with clear errors.
        parser.add_argument(f"--{f.name}", nargs=nargs, const="true" if nargs == "?" else None,
                            default=argparse.SUPPRESS, metavar="VALUE", help=f"(default: {default!r})")
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    path = args.pop("config")
    return load_config(path, overrides=args)


def main(argv: list[str] | None = None) -> TrainResult:
    config = parse_config(argv)
    main_process = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    return train(config)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, TypeError, OSError, FloatingPointError) as err:  # config, data, checkpoint, NaN: one line
        raise SystemExit(f"error: {err}") from None
