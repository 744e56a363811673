"""SliderEdit on FLUX.1 Kontext [dev]: a from-scratch PyTorch reference implementation.

The exports load on first use (PEP 562), so `import slideredit.cli` (infer.py's argument parsing) does
not import torch and transformers: --help and argument errors answer at once.

The Triton kernels import as `slideredit.kernels` (from slideredit.kernels.masked_lora import
masked_lora_linear). Their source is the repository's top-level kernels/ folder, which an install (wheel or
editable) maps to slideredit/kernels. Never as top-level `kernels`: that is Hugging Face's package, which
transformers >= 5.25 imports. The root scripts import as slideredit.scripts, for the console commands."""
import importlib
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

_EXPORTS = {"AutoEncoder": ".autoencoder", "AutoEncoderParams": ".autoencoder", "load_autoencoder": ".autoencoder",
            "CheckpointError": ".checkpoint", "SliderEditFluxKontextPipeline": ".pipelines",
            "Flux": ".transformer", "FluxParams": ".transformer", "load_flux": ".transformer_loading"}
__all__ = sorted(_EXPORTS)


def _map_checkout_folders() -> None:
    """In a checkout (scripts run from it, or an editable install), import the repository's kernels/ folder
    as slideredit.kernels and its root scripts (infer.py, train.py, eval.py) as slideredit.scripts, as a
    wheel lays them out. A wheel's real slideredit/kernels/ and slideredit/scripts/ folders need nothing."""
    package = Path(__file__).resolve().parent
    repository = package.parent
    if not (repository / "kernels" / "masked_lora.py").is_file():
        return
    for name, folder in (("kernels", repository / "kernels"), ("scripts", repository)):
        full_name = f"{__name__}.{name}"
        if full_name in sys.modules or (package / name).is_dir():
            continue
        spec = importlib.machinery.ModuleSpec(full_name, None, is_package=True)
        spec.submodule_search_locations = [str(folder)]
        sys.modules[full_name] = globals()[name] = importlib.util.module_from_spec(spec)


_map_checkout_folders()


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
