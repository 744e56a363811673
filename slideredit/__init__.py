"""SliderEdit on FLUX.1 Kontext [dev]: a from-scratch PyTorch reference implementation.

The exports load on first use (PEP 562), so `import slideredit.cli` (infer.py's argument parsing) does
not import torch and transformers: --help and argument errors answer at once."""
import importlib

_EXPORTS = {"AutoEncoder": ".autoencoder", "AutoEncoderParams": ".autoencoder", "load_autoencoder": ".autoencoder",
            "CheckpointError": ".checkpoint", "SliderEditFluxKontextPipeline": ".pipelines",
            "Flux": ".transformer", "FluxParams": ".transformer", "load_flux": ".transformer_loading"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
