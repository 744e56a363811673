"""Training SliderEdit adapters (GSTLoRA, STLoRA with PPS) by self-distillation on FLUX.1 Kontext [dev].

    config.py       the YAML configuration (the release's field names)
    data.py         instruction-editing rows and image folders; sample order and per-sample randomness
    losses.py       the self-distillation loss and the PPS prompts
    encoding.py     the frozen VAE and text encoders, offloaded or cached on disk
    checkpoints.py  checkpoint-N folders written atomically, and resuming
    outputs.py      what a run writes under output_dir: refusing to mix runs, --overwrite
    distributed.py  torchrun / DistributedDataParallel
    validation.py   slider-sweep grids during training
    loop.py         the loop
"""
from .config import ConfigError, TrainConfig, load_config
from .loop import TrainingDiverged, TrainResult, train

__all__ = ["ConfigError", "TrainConfig", "TrainResult", "TrainingDiverged", "load_config", "train"]
