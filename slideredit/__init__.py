"""SliderEdit on FLUX.1 Kontext [dev]: a from-scratch PyTorch reference implementation."""
from .checkpoint import CheckpointError
from .transformer import Flux, FluxParams
from .transformer_loading import load_flux

__all__ = ["CheckpointError", "Flux", "FluxParams", "load_flux"]
