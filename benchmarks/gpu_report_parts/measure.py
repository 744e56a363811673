"""Timing and memory helpers shared by the parts; on the CPU the memory ones measure nothing (None)."""
from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def peak_reserved_gib(device: str) -> float | None:
    """What the caching allocator held at most: closer to what the device must have free than peak_gib."""
    return torch.cuda.max_memory_reserved() / 2**30 if device == "cuda" else None


def resident_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (fp8 weights: one per element)."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def wall(fn: Callable[[], object], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def time_calls(fn: Callable[[], object], device: str, repeats: int) -> tuple[list[float], float | None]:
    """One warm-up call, then `repeats` timed calls; -> (seconds per call, peak GiB of the timed calls)."""
    fn()
    reset_peak(device)
    seconds = [wall(fn, device) for _ in range(repeats)]
    return seconds, peak_gib(device)


def out_of_time(deadline: float) -> bool:
    return time.perf_counter() > deadline


def spread_ms(seconds: list[float]) -> str:
    ms = sorted(s * 1e3 for s in seconds)
    return f"{ms[0]:.1f} / {statistics.median(ms):.1f} / {ms[-1]:.1f}"


def fmt_gib(value: float | None) -> str:
    return "n/a (CPU)" if value is None else f"{value:.2f}"


def exception_line(e: Exception, max_chars: int) -> str:
    """The exception's type and the start of its message's first line."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:max_chars] if str(e) else ''}"


def error_text(e: Exception) -> str:
    """A failed case's cell (a compile or launch failure is a finding, recorded in its row)."""
    return f"error: {exception_line(e, 120)}"
