"""Self-verifying backend choice ("auto") for the masked LoRA linear on CUDA.

The first call for a shape key runs the Triton and the PyTorch path on the same inputs, checks that they
agree, times both with CUDA events and keeps the faster; the choice is cached in the process and on disk,
so later calls (and later processes on the same GPU and versions) measure nothing: a cached key costs one
dict lookup and a device guard. A Triton path that disagrees, fails to compile or fails to launch loses its
key to PyTorch, with one warning naming the shape and the reason.

Which backend a call gets (first match):
  1. the `backend=` argument ("triton", "torch" or "auto"): code that needs one path says so, e.g. the
     PyTorch path for stacks the Triton kernel cannot hold; it wins over the environment;
  2. CPU (any non-CUDA) tensors: "torch";
  3. the environment variable SLIDEREDIT_LORA_BACKEND=auto|triton|torch;
  4. "auto". Inside auto, inputs the Triton kernels do not serve well or at all (fp32 and fp64: IEEE fp32
     tiles spill, cuBLAS has TF32 / tensor-core paths; stacks over 128 ranks; no triton installed)
     take PyTorch without measuring; so does every call on a card the kernels cannot serve (below
     sm_80, or where Triton failed to build them: kernels/masked_lora.py, one warning per card).

Agreement: for every output tensor (H~ / G~ and Y / dX), max |triton - torch| <= TOLERANCE[dtype] *
max |torch|, dtype being x's (non-finite values must sit at the same positions). Both paths accumulate in
fp32 and round the output once; the bound is 4 ulps of the compute dtype at the output's scale, with fp32
at TF32's precision since either side may use TF32 when torch allows it: bf16 2^-5, fp16 2^-8, fp32 2^-9.
It catches a wrong build (garbage, a missing term, a broken tile); Y's check sees the low-rank term only
at Y's scale, which is why H~ (the low-rank part alone) is checked too.

Where and when it measures:
  - on the inputs' device: every call, the measurement and the timing events run under a guard for
    that device, on its current stream (with `--device cuda:1` the current device may be GPU 0);
  - timing: up to REPS interleaved samples per backend (at least MIN_REPS), each after a write of twice
    the GPU's L2 cache (each sample reads its operands from memory, as a layer does in the model), until
    BUDGET_S of device time has been measured;
  - never while a CUDA graph is being captured (checking and timing synchronise, which would invalidate
    the capture): an undecided key takes the PyTorch path there, unsaved, and is decided on a later call;
  - a choice read from disk is confirmed by its first call, under the lock that guards decisions (Triton
    autotunes and compiles there); a Triton failure there, or on any later call, hands the key to PyTorch
    as a failure while measuring does.

Which verdicts are saved: a "faster" decision, a disagreement and a Triton build failure (compile error,
out of shared memory, ptxas) repeat on every run of the same build, so they go to disk. Anything else
(out of memory while both paths' outputs are alive, a capture or launch error) may not repeat: the key
takes PyTorch in this process only and is measured again in the next. A compute that raises
CardUnsupported (masked_lora.py's, for a compile or ptxas error: the kernels do not build on this card at
all) gets no verdict: the error goes back to the caller, which turns the card off for the process.

Disk cache: $XDG_CACHE_HOME/slideredit/lora_dispatch.json (default ~/.cache/slideredit/), one section per
versions(): torch, triton, the CUDA runtime and driver, and a hash of the kernels' source (an edit of
kernels/*.py re-verifies every key). Entries keyed by the shape key (GPU name first). Rewritten
atomically (slideredit.atomic.atomic_path: temporary file + rename, the mode a plain open() gives) after
each saved decision, merged with what other processes wrote meanwhile. A corrupt file is ignored (one
warning) and rewritten.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import os
import statistics
import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..atomic import atomic_path

ENV_VAR = "SLIDEREDIT_LORA_BACKEND"
CHOICES = ("auto", "triton", "torch")
CACHE_FORMAT = 1
TOLERANCE = {torch.bfloat16: 2.0**-5, torch.float16: 2.0**-8, torch.float32: 2.0**-9}
REPS = 20  # at most this many timed samples per backend, interleaved
MIN_REPS = 3  # at least this many, even past the budget: a median of one or two samples is noise
BUDGET_S = 0.05  # stop timing a key once this much device time has been measured (after compilation)
_CHUNK = 1 << 22  # elements compared at a time: the check never holds an fp32 copy of a whole output
# Triton's build failures: the same on every run of one build on one card, so worth saving to disk.
# Matched by name, so that this module imports without triton.
_BUILD_ERRORS = ("CompilationError", "OutOfResources", "PTXASError")
_KERNELS_DIR = Path(__file__).parent

Timer = Callable[[Callable[[], object], torch.device], float]


class CardUnsupported(Exception):
    """Raised by compute("triton") when the Triton kernels cannot be built on this card at all: passed on
    to the caller, which takes the PyTorch path for the whole card; no key gets a verdict from it."""


class Key(NamedTuple):
    """What decides the winner: the card, the operation and everything that changes its build or cost."""

    device: str  # GPU name
    op: str  # "forward", "backward_dx" (G~ and dX), "backward_g" (G~ only)
    x_dtype: str
    weight_dtype: str
    adapter_dtype: str  # lora_a / lora_b (cast to x's dtype tile by tile)
    n: int  # output features
    d: int  # reduction length
    stacked_rank: int  # K*r
    m_bucket: int  # tokens rounded up to a power of two
    layout: str  # which operands are contiguous along the reduction
    extras: str  # bias, fp8 weight scale, ...

    def text(self) -> str:
        return "|".join(str(part) for part in self)


@dataclass
class Decision:
    key: Key
    backend: str
    reason: str  # "faster", or why the Triton path lost its key
    ms: dict[str, float] = field(default_factory=dict)  # median time per backend
    source: str = "measured"  # "measured" in this process, or "disk"
    transient: bool = False  # lost to a failure that may not repeat: kept in this process only


def m_bucket(m: int) -> int:
    """m rounded up to a power of two (1 for 0 and 1)."""
    return 1 << max(m - 1, 0).bit_length()


def resolve(backend: str | None, is_cuda: bool, env: Mapping[str, str] = os.environ) -> str:
    """The backend a call asks for: "triton", "torch" or "auto" (see the module docstring for the order)."""
    if backend is not None:
        if backend not in CHOICES:
            raise ValueError(f"masked_lora_linear: backend must be one of {CHOICES} or None, got {backend!r}")
        return backend
    if not is_cuda:
        return "torch"
    forced = env.get(ENV_VAR, "").strip().lower()
    if forced and forced not in CHOICES:
        raise ValueError(f"{ENV_VAR} must be one of {CHOICES}, got {env[ENV_VAR]!r}")
    return forced or "auto"


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Run launches on `device` (its current stream), not on the current CUDA device: Triton launches on
    the current device whatever its arguments' device is. No-op for other devices."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def cuda_event_timer(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of fn takes on `device`'s current stream."""
    stream = torch.cuda.current_stream(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(stream)
    fn()
    end.record(stream)
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def l2_flush_bytes(device: torch.device) -> int:
    """Twice the device's L2 cache: writing this many bytes evicts whatever a timed call left there."""
    return 2 * torch.cuda.get_device_properties(device).L2_cache_size


def flush_l2(device: torch.device) -> None:
    """Evict the L2 cache of `device` before a timed sample, so that each sample reads its operands from
    memory (in the model, a layer's weight is not in L2 when the layer runs)."""
    torch.empty(l2_flush_bytes(device), dtype=torch.uint8, device=device).zero_()


def default_cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "slideredit" / "lora_dispatch.json"


@functools.cache
def kernels_source_hash(folder: Path = _KERNELS_DIR) -> str:
    """A hash of the kernels' source (every .py file in `folder`, by name and content), read once."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@functools.cache
def cuda_driver_version() -> str:
    """The CUDA driver's version (cuDriverGetVersion, e.g. 12040), "none" without CUDA: the driver's JIT
    and its limits change what a build does. torch does not report it, so it is asked directly."""
    if not torch.cuda.is_available():
        return "none"
    for library in ("libcuda.so.1", "nvcuda.dll"):
        try:
            libcuda = ctypes.CDLL(library)
        except OSError:
            continue
        version = ctypes.c_int()
        if libcuda.cuDriverGetVersion(ctypes.byref(version)) == 0:
            return str(version.value)
    return "unknown"


def versions() -> str:
    """The disk cache's section: new torch, triton, CUDA or driver versions, or an edit of the kernels,
    re-measure everything."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return (f"torch {torch.__version__} | triton {triton_version} | cuda {torch.version.cuda} | "
            f"driver {cuda_driver_version()} | kernels {kernels_source_hash()}")


def disagreement(reference: tuple[torch.Tensor, ...], other: tuple[torch.Tensor, ...], tolerance: float) -> str | None:
    """Why `other` does not match `reference` within tolerance * max |reference| per tensor, or None."""
    for i, (ref, out) in enumerate(zip(reference, other, strict=True)):
        if ref.shape != out.shape:
            return f"output {i} has shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
        err = scale = 0.0
        for r, o in zip(ref.reshape(-1).split(_CHUNK), out.reshape(-1).split(_CHUNK)):
            finite = torch.isfinite(r)
            if not torch.equal(finite, torch.isfinite(o)):
                return f"output {i} has non-finite values where the PyTorch path has none, or the reverse"
            r, o = r.float(), o.float()
            err = max(err, torch.where(finite, o - r, 0.0).abs().max().item())
            scale = max(scale, torch.where(finite, r, 0.0).abs().max().item())
        if err > tolerance * scale:
            return f"output {i}: max |triton - torch| = {err:.3g} > {tolerance:.3g} x max |torch| = {scale:.3g}"
    return None


def describe(error: Exception) -> str:
    """One line naming a failure. Triton's compile errors keep their reason in `error_message`: their
    text starts with a source excerpt ("at 1:0:")."""
    text = getattr(error, "error_message", None) or str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def is_build_error(error: Exception) -> bool:
    """Whether `error` is one of Triton's build failures, which repeat on every run of the same build."""
    return any(cls.__module__.startswith("triton.") and cls.__name__ in _BUILD_ERRORS for cls in type(error).__mro__)


class Dispatcher:
    """Measures each new key once, then answers from memory. `timer`, `flush` and `cache_path` are the
    seams: CUDA events, an L2 flush and the user cache file by default; tests give a fake clock, a
    recording flush and a temporary file."""

    def __init__(self, cache_path: Path | None = None, timer: Timer = cuda_event_timer,
                 flush: Callable[[torch.device], None] = flush_l2, reps: int = REPS, min_reps: int = MIN_REPS,
                 budget_s: float = BUDGET_S):
        self.cache_path = cache_path
        self.timer, self.flush = timer, flush
        self.reps, self.min_reps, self.budget_s = reps, min_reps, budget_s
        self._choices: dict[Key, str] = {}  # the hot path: decided, or read from disk and confirmed by a call
        self._records: dict[Key, Decision] = {}
        self._disk: dict[str, dict] | None = None  # this versions() section of the file, read on the first miss
        self._lock = threading.RLock()  # re-entered when a call under it hands its key to PyTorch
        self._warned_file = False

    def run(self, key: Key, compute: Callable[[str], tuple[torch.Tensor, ...]], tolerance: float,
            device: torch.device) -> tuple:
        """compute(backend) -> output tensors of inputs on `device`; the reference is "torch". Returns the
        chosen backend's outputs."""
        with on_device(device):
            choice = self._choices.get(key)
            if choice is not None:
                return self._call(key, choice, compute)
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                return compute("torch")  # deciding would synchronise inside the capture: decide on a later call
            with self._lock:
                return self._decide(key, compute, tolerance, device)

    def decisions(self) -> list[Decision]:
        return list(self._records.values())

    def _call(self, key: Key, backend: str, compute) -> tuple:
        """compute(backend) for a chosen backend. A Triton failure there (the first call of a choice read
        from disk, which autotunes; a new specialisation that fails to build) hands the key to PyTorch."""
        try:
            return compute(backend)
        except Exception as error:
            if backend != "triton" or isinstance(error, CardUnsupported):
                raise
            with self._lock:
                self._lose(key, describe(error), saved=is_build_error(error))
            return compute("torch")

    def _decide(self, key: Key, compute, tolerance: float, device: torch.device) -> tuple:
        if key in self._choices:  # another thread decided it while this one waited for the lock
            return self._call(key, self._choices[key], compute)
        stored = self._read_disk().get(key.text())
        if stored is not None and stored.get("backend") in ("triton", "torch"):
            decision = Decision(key, stored["backend"], stored.get("reason", ""), stored.get("ms", {}), "disk")
            outputs = self._call(key, decision.backend, compute)  # under the lock: Triton autotunes here
            if key not in self._choices:  # the call succeeded: later calls skip the lock
                self._remember(decision)
            return outputs

        reference = compute("torch")  # a failure here is the caller's error: let it raise
        try:
            candidate = compute("triton")  # compiles and autotunes
            problem = disagreement(reference, candidate, tolerance)
            times = None if problem else self._time(compute, device)
        except CardUnsupported:
            raise
        except Exception as error:  # a compile or launch failure of the Triton path, or out of memory
            self._lose(key, describe(error), saved=is_build_error(error))
            return reference
        if problem:
            self._lose(key, problem, saved=True)
            return reference
        backend = "triton" if times["triton"] < times["torch"] else "torch"
        decision = Decision(key, backend, "faster", {b: t * 1e3 for b, t in times.items()})
        self._remember(decision)
        self._write_disk(decision)
        return candidate if backend == "triton" else reference

    def _lose(self, key: Key, problem: str, saved: bool) -> None:
        """The key takes PyTorch, with one warning; on disk too if the failure repeats (`saved`)."""
        scope = "for this shape" if saved else "for this shape in this process (the next one tries again)"
        warnings.warn(f"masked_lora_linear: the Triton path is not used for {key.text()}: {problem}; "
                      f"using the PyTorch path {scope}", RuntimeWarning, stacklevel=5)
        decision = Decision(key, "torch", problem, transient=not saved)
        self._remember(decision)
        if saved:
            self._write_disk(decision)

    def _time(self, compute, device: torch.device) -> dict[str, float]:
        """Median seconds per backend over interleaved rounds, each sample after an L2 flush: at least
        `min_reps` rounds, at most `reps`, fewer past the budget."""
        samples = {"triton": [], "torch": []}
        spent = 0.0
        for rounds in range(1, self.reps + 1):
            for backend, times in samples.items():
                self.flush(device)
                times.append(self.timer(lambda b=backend: compute(b), device))
                spent += times[-1]
            if rounds >= self.min_reps and spent >= self.budget_s:
                break
        return {backend: statistics.median(times) for backend, times in samples.items()}

    def _remember(self, decision: Decision) -> None:
        self._records[decision.key] = decision
        self._choices[decision.key] = decision.backend

    # -- the file ------------------------------------------------------------------------------------------

    def _load_file(self) -> dict:
        """The whole cache file as a dict ({} if missing, or corrupt: then one warning)."""
        if self.cache_path is None or not self.cache_path.exists():
            return {}
        try:
            data = json.loads(self.cache_path.read_text())
            if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("sections"), dict):
                raise ValueError("not a slideredit dispatch cache")
            if not all(isinstance(v, dict) for v in data["sections"].values()):
                raise ValueError("a section is not a mapping")
            return data
        except (OSError, ValueError, UnicodeDecodeError) as error:
            self._warn_file(f"ignoring the backend cache {self.cache_path} ({error}); it will be rewritten")
            return {}

    def _read_disk(self) -> dict[str, dict]:
        if self._disk is None:
            section = self._load_file().get("sections", {}).get(versions(), {})
            self._disk = {k: v for k, v in section.items() if isinstance(v, dict)}
        return self._disk

    def _write_disk(self, decision: Decision) -> None:
        if self.cache_path is None:
            return
        record = {"backend": decision.backend, "reason": decision.reason, "ms": decision.ms}
        self._read_disk()[decision.key.text()] = record
        data = self._load_file()  # merge with what other processes wrote since we read it
        sections = data.get("sections", {})
        sections.setdefault(versions(), {}).update(self._disk)
        text = json.dumps({"format": CACHE_FORMAT, "sections": sections}, indent=1, sort_keys=True)
        try:
            with atomic_path(self.cache_path) as temp:  # readers see the old file or the new one, never a part
                temp.write_text(text)
        except OSError as error:
            self._warn_file(f"cannot write the backend cache {self.cache_path} ({error}); decisions stay in memory")

    def _warn_file(self, message: str) -> None:
        if not self._warned_file:
            self._warned_file = True
            warnings.warn(message, RuntimeWarning, stacklevel=5)


_default: Dispatcher | None = None


def dispatcher() -> Dispatcher:
    """The process-wide dispatcher (CUDA-event timer, the user cache file), created on first use."""
    global _default
    if _default is None:
        _default = Dispatcher(default_cache_path())
    return _default


def use_dispatcher(new: Dispatcher | None) -> Dispatcher | None:
    """Replace the process-wide dispatcher (None: a fresh default on next use); returns the previous one."""
    global _default
    previous, _default = _default, new
    return previous


def decisions() -> list[dict[str, Any]]:
    """What auto chose in this process, one record per key: the key's fields, backend, reason, ms, source."""
    if _default is None:
        return []
    return [{**d.key._asdict(), **{k: v for k, v in asdict(d).items() if k != "key"}} for d in _default.decisions()]
