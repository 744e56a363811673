"""Training SliderEdit adapters (GSTLoRA, STLoRA with PPS) by self-distillation on FLUX.1 Kontext [dev].

    config.py       the YAML configuration (the release's field names)
    data.py         instruction-editing rows and image folders; sample order and per-sample randomness
    losses.py       the self-distillation loss and the PPS prompts
    encoding.py     the frozen VAE and text encoders, offloaded or cached on disk
    checkpoints.py  checkpoint-N folders written atomically, and resuming
    outputs.py      what a run writes under output_dir: refusing to mix runs, --overwrite
    distributed.py  torchrun: DistributedDataParallel, or FSDP sharding the model
    validation.py   slider-sweep grids during training
    loop.py         the loop

The exports load on first use (PEP 562), so that reading a config (train.py --help, argument errors)
does not import torch and transformers.
"""
import importlib

_EXPORTS = {"ConfigError": ".config", "TrainConfig": ".config", "load_config": ".config",
            "TrainingDiverged": ".loop", "TrainResult": ".loop", "train": ".loop"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
