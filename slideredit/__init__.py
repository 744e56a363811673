"""SliderEdit on FLUX.1 Kontext [dev]: a from-scratch PyTorch reference implementation."""
from .autoencoder import AutoEncoder, AutoEncoderParams, load_autoencoder
from .checkpoint import CheckpointError
from .pipelines import SliderEditFluxKontextPipeline
from .transformer import Flux, FluxParams
from .transformer_loading import load_flux

__all__ = ["AutoEncoder", "AutoEncoderParams", "CheckpointError", "Flux", "FluxParams", "load_autoencoder",
           "load_flux", "SliderEditFluxKontextPipeline"]
