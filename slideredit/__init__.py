"""SliderEdit on FLUX.1 Kontext [dev]: a from-scratch PyTorch reference implementation.

The exports load on first use (PEP 562), so `import slideredit.cli` (infer.py's argument parsing) does
not import torch and transformers: --help and argument errors answer at once.

The Triton kernels import as `slideredit.kernels` (from slideredit.kernels.masked_lora import
masked_lora_linear). Their source is the repository's top-level kernels/ folder, which an install (wheel or
editable) maps to slideredit/kernels. Never as top-level `kernels`: that is Hugging Face's package, which
transformers >= 5.25 imports."""
import importlib
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

_EXPORTS = {"AutoEncoder": ".autoencoder", "AutoEncoderParams": ".autoencoder", "load_autoencoder": ".autoencoder",
            "CheckpointError": ".checkpoint", "SliderEditFluxKontextPipeline": ".pipelines",
            "Flux": ".transformer", "FluxParams": ".transformer", "load_flux": ".transformer_loading"}
__all__ = sorted(_EXPORTS)


def _map_checkout_kernels() -> None:
    """In a checkout (scripts run from it, or an editable install), make ../kernels/ the package
    slideredit.kernels, as a wheel lays it out. An installed slideredit/kernels/ folder takes precedence."""
    package = Path(__file__).resolve().parent
    source = package.parent / "kernels"
    name = f"{__name__}.kernels"
    if name in sys.modules or (package / "kernels").is_dir() or not (source / "masked_lora.py").is_file():
        return
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(source)]
    sys.modules[name] = globals()["kernels"] = importlib.util.module_from_spec(spec)


_map_checkout_kernels()


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
