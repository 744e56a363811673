"""kernels.dispatch: the self-verifying backend choice, all on the CPU.

The dispatcher's seams are its `compute(backend)` callable, its timer and its cache file: here the
candidates are plain tensors (right, wrong, raising), the timer is a fake clock that says which backend
is faster, and the cache lives in a temporary directory. The last tests run masked_lora_linear with
backend="auto" through the real kernels (Triton in the interpreter).
"""
import ast
import contextlib
import ctypes
import json
import os
import shutil
import threading
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from slideredit.kernels import dispatch, masked_lora_triton
from slideredit.kernels.masked_lora import fp8_linear, masked_lora_linear
from slideredit.kernels.dispatch import Dispatcher, Key
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources, PTXASError

CPU = torch.device("cpu")
KEY = Key("Fake GPU", "forward", "bfloat16", "bfloat16", "float32", 45, 51, 12, 128, "x:row w:row", "bias")
OTHER_KEY = KEY._replace(m_bucket=256)
TOL = dispatch.TOLERANCE[torch.bfloat16]


class FakeClock:
    """timer(fn, device): runs fn and reports the time set for the backend that fn computes. Its flush
    (the dispatcher's L2 flush) is logged in `calls` too, as "flush"."""

    def __init__(self, seconds: dict[str, float]):
        self.seconds, self.calls = seconds, []

    def __call__(self, fn, device):
        before = len(self.calls)
        fn()
        assert len(self.calls) == before + 1, "the timer must run exactly one backend call"
        return self.seconds[self.calls[-1]]

    def flush(self, device):
        self.calls.append("flush")


class Candidates:
    """compute(backend): the torch output is `reference`; triton's is `triton` (a tensor or an exception)."""

    def __init__(self, clock: FakeClock | None, triton=None, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.reference = (torch.randn(6, 12, generator=g), torch.randn(6, 45, generator=g).bfloat16())
        self.triton = self.reference if triton is None else triton
        self.clock = clock
        self.calls = []

    def __call__(self, backend):
        self.calls.append(backend)
        if self.clock is not None:
            self.clock.calls.append(backend)
        out = self.reference if backend == "torch" else self.triton
        if isinstance(out, Exception):
            raise out
        return out


def make(tmp_path, triton_s=1e-3, torch_s=2e-3, **kwargs):
    clock = FakeClock({"triton": triton_s, "torch": torch_s})
    return Dispatcher(tmp_path / "cache" / "lora_dispatch.json", timer=clock, flush=clock.flush, **kwargs), clock


def test_faster_backend_wins_and_the_next_call_measures_nothing(tmp_path):
    d, clock = make(tmp_path, triton_s=1e-3, torch_s=3e-3)
    cands = Candidates(clock)
    assert d.run(KEY, cands, TOL, CPU) is cands.reference  # the same tensors: the triton fake returns them
    (decision,) = d.decisions()
    assert (decision.backend, decision.reason, decision.source) == ("triton", "faster", "measured")
    assert decision.ms == {"triton": 1.0, "torch": 3.0}
    timed = len(clock.calls)

    cands.calls.clear()
    d.run(KEY, cands, TOL, CPU)
    assert cands.calls == ["triton"] and len(clock.calls) == timed + 1  # one call of the winner, untimed


def test_slow_triton_loses(tmp_path):
    d, clock = make(tmp_path, triton_s=5e-3, torch_s=2e-3)
    cands = Candidates(clock)
    d.run(KEY, cands, TOL, CPU)
    assert d.decisions()[0].backend == "torch"
    cands.calls.clear()
    d.run(KEY, cands, TOL, CPU)
    assert cands.calls == ["torch"]


@pytest.mark.parametrize("seconds,rounds", [
    ((0.01, 0.02), dispatch.MIN_REPS),  # the budget is spent after 2 rounds: still MIN_REPS (3)
    ((0.002, 0.003), 10),  # 0.005 s a round: the 0.05 s budget after 10
    ((1e-4, 1e-4), dispatch.REPS),  # never reaches the budget: REPS (20)
])
def test_timing_interleaves_flushes_l2_and_stops_at_the_budget(tmp_path, seconds, rounds):
    d, clock = make(tmp_path, triton_s=seconds[0], torch_s=seconds[1])
    d.run(KEY, Candidates(clock), TOL, CPU)
    # one untimed call each (compile + check), then rounds of (triton, torch), each sample after a flush
    assert clock.calls == ["torch", "triton"] + ["flush", "triton", "flush", "torch"] * rounds


def test_the_l2_flush_writes_more_than_the_l2_cache(monkeypatch):
    """flush_l2 writes a buffer larger than the device's L2 (here a fake 4 KiB L2, on the CPU), one byte
    op over all of it, so that no operand of the timed call is left in the cache."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class WrittenBytes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.writes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func._schema.is_mutable:  # zero_, fill_, copy_: an in-place write of its first argument
                self.writes.append(args[0].numel() * args[0].element_size())
            return out

    l2_bytes = 4096
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(L2_cache_size=l2_bytes))
    with WrittenBytes() as mode:
        dispatch.flush_l2(CPU)
    assert len(mode.writes) == 1 and mode.writes[0] > l2_bytes


def wrong_by(reference, factor):
    """Triton outputs whose worst error is factor * TOL * max |reference| (in Y, the second tensor)."""
    h, y = reference
    bad = y.float().clone()
    bad.view(-1)[7] += factor * TOL * y.float().abs().max()
    return h, bad.bfloat16()


@pytest.mark.parametrize("factor,agrees", [(0.5, True), (2.0, False)])
def test_agreement_bound_is_relative_to_the_output_scale(tmp_path, factor, agrees):
    d, clock = make(tmp_path)
    ref = Candidates(None).reference
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        d.run(KEY, Candidates(clock, triton=wrong_by(ref, factor)), TOL, CPU)
    assert (d.decisions()[0].backend == "triton") == agrees
    assert len(caught) == (0 if agrees else 1)


@pytest.mark.parametrize("factor,agrees", [(0.5, True), (2.0, False)])
def test_agreement_counts_every_chunk(tmp_path, monkeypatch, factor, agrees):
    """Outputs are compared a chunk at a time: the first chunk's error and scale count as the last's.
    Here both sit in chunk 0 of Y (its largest value and the error); chunks of 16 give Y 17 of them."""
    monkeypatch.setattr(dispatch, "_CHUNK", 16)
    d, clock = make(tmp_path)
    cands = Candidates(clock)
    h, y = cands.reference
    y = y.float().clone()
    y.view(-1)[3] = 100 * y.abs().max()  # the output's scale, far above every later chunk's
    cands.reference = (h, y.bfloat16())
    cands.triton = wrong_by(cands.reference, factor)  # the error is at element 7
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        d.run(KEY, cands, TOL, CPU)
    assert (d.decisions()[0].backend, len(caught)) == (("triton", 0) if agrees else ("torch", 1))


def test_the_check_covers_every_output(tmp_path):
    d, clock = make(tmp_path)
    ref = Candidates(None).reference
    with pytest.warns(RuntimeWarning, match="output 0"):
        d.run(KEY, Candidates(clock, triton=(ref[0] * 1.5, ref[1])), TOL, CPU)
    assert d.decisions()[0].backend == "torch"


def test_non_finite_values_must_match():
    ref = (torch.tensor([1.0, float("inf"), 2.0]),)
    assert dispatch.disagreement(ref, (torch.tensor([1.0, float("inf"), 2.0]),), TOL) is None
    assert "non-finite" in dispatch.disagreement(ref, (torch.tensor([1.0, 3.0, float("nan")]),), TOL)
    assert "shape" in dispatch.disagreement(ref, (torch.ones(4),), TOL)


@pytest.mark.parametrize("failure", ["disagrees", "compile error", "launch error"])
def test_failing_triton_falls_back_to_torch_with_one_warning(tmp_path, failure):
    d, clock = make(tmp_path, triton_s=1e-6)  # it would win on time
    ref = Candidates(None).reference
    triton = {"disagrees": wrong_by(ref, 100.0), "compile error": OutOfResources(262144, 232448, "shared memory"),
              "launch error": ValueError("an illegal memory access was encountered")}[failure]
    cands = Candidates(clock, triton=triton)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = [d.run(KEY, cands, TOL, CPU) for _ in range(3)]
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert KEY.text() in message and "PyTorch" in message
    assert {"disagrees": "max |triton - torch|", "compile error": "OutOfResources",
            "launch error": "illegal memory access"}[failure] in message
    assert all(out is cands.reference for out in outputs)
    assert cands.calls.count("triton") == 1  # tried once, never again
    assert d.decisions()[0].backend == "torch"


def test_a_failing_torch_path_raises(tmp_path):
    d, clock = make(tmp_path)
    cands = Candidates(clock)
    cands.reference = MemoryError("out of memory")
    with pytest.raises(MemoryError):
        d.run(KEY, cands, TOL, CPU)


def test_disk_cache_hit_measures_nothing(tmp_path):
    d, clock = make(tmp_path, triton_s=1e-3, torch_s=3e-3)
    d.run(KEY, Candidates(clock), TOL, CPU)

    def no_timing(fn):
        raise AssertionError("a cached key was measured again")

    later = Dispatcher(d.cache_path, timer=no_timing)  # a new process
    cands = Candidates(None)
    later.run(KEY, cands, TOL, CPU)
    assert cands.calls == ["triton"]
    (decision,) = later.decisions()
    assert (decision.backend, decision.source, decision.ms) == ("triton", "disk", {"triton": 1.0, "torch": 3.0})


def test_disk_cache_miss_for_another_key_or_other_versions(tmp_path, monkeypatch):
    d, clock = make(tmp_path)
    d.run(KEY, Candidates(clock), TOL, CPU)
    other, clock2 = make(tmp_path)
    other.run(OTHER_KEY, Candidates(clock2), TOL, CPU)
    assert other.decisions()[0].source == "measured"

    monkeypatch.setattr(dispatch, "versions", lambda: "torch 9.9 | triton 9.9")
    upgraded, clock3 = make(tmp_path)
    upgraded.run(KEY, Candidates(clock3), TOL, CPU)
    assert upgraded.decisions()[0].source == "measured"
    sections = json.loads(d.cache_path.read_text())["sections"]
    assert len(sections) == 2 and {KEY.text(), OTHER_KEY.text()} <= set(sections[next(iter(sections))])


def test_processes_merge_their_entries(tmp_path):
    first, c1 = make(tmp_path)
    second, c2 = make(tmp_path)
    second.run(OTHER_KEY._replace(n=1), Candidates(c2), TOL, CPU)  # second has read the (empty) file
    first.run(KEY, Candidates(c1), TOL, CPU)
    second.run(OTHER_KEY, Candidates(c2), TOL, CPU)  # its copy lacks KEY: the write must merge, not overwrite
    entries = json.loads(first.cache_path.read_text())["sections"][dispatch.versions()]
    assert set(entries) == {KEY.text(), OTHER_KEY.text(), OTHER_KEY._replace(n=1).text()}


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"format": 1, "sections": {"x": 3}}', "\udcff"])
def test_corrupt_cache_file_is_ignored_once_and_rewritten(tmp_path, content):
    d, clock = make(tmp_path)
    d.cache_path.parent.mkdir(parents=True)
    d.cache_path.write_bytes(content.encode("utf-8", "surrogateescape"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        d.run(KEY, Candidates(clock), TOL, CPU)
        d.run(OTHER_KEY, Candidates(clock), TOL, CPU)
    assert len(caught) == 1 and "ignoring the backend cache" in str(caught[0].message)
    data = json.loads(d.cache_path.read_text())
    assert data["format"] == dispatch.CACHE_FORMAT
    assert set(data["sections"][dispatch.versions()]) == {KEY.text(), OTHER_KEY.text()}


def test_cache_file_is_written_atomically_with_the_umask_mode(tmp_path, monkeypatch):
    d, clock = make(tmp_path)
    old = os.umask(0o027)
    try:
        d.run(KEY, Candidates(clock), TOL, CPU)
    finally:
        os.umask(old)
    assert d.cache_path.stat().st_mode & 0o777 == 0o640  # what open(path, "w") gives under this umask
    assert os.listdir(d.cache_path.parent) == [d.cache_path.name]  # no temporary file left

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    before = d.cache_path.read_text()
    with pytest.warns(RuntimeWarning, match="cannot write the backend cache"):
        d.run(OTHER_KEY, Candidates(clock), TOL, CPU)
    assert d.cache_path.read_text() == before and os.listdir(d.cache_path.parent) == [d.cache_path.name]
    assert d.decisions()[-1].key == OTHER_KEY  # still decided, in memory


def test_default_cache_path_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert dispatch.default_cache_path() == tmp_path / "slideredit" / "lora_dispatch.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert dispatch.default_cache_path() == tmp_path / "home" / ".cache" / "slideredit" / "lora_dispatch.json"


def test_resolve_order():
    env = {dispatch.ENV_VAR: "triton"}
    assert dispatch.resolve(None, is_cuda=True, env={}) == "auto"
    assert dispatch.resolve(None, is_cuda=True, env=env) == "triton"
    assert dispatch.resolve(None, is_cuda=True, env={dispatch.ENV_VAR: " Torch "}) == "torch"
    assert dispatch.resolve("torch", is_cuda=True, env=env) == "torch"  # the argument wins
    assert dispatch.resolve("auto", is_cuda=True, env={dispatch.ENV_VAR: "torch"}) == "auto"
    assert dispatch.resolve(None, is_cuda=False, env=env) == "torch"  # the variable is about CUDA tensors
    with pytest.raises(ValueError, match="SLIDEREDIT_LORA_BACKEND must be one of"):
        dispatch.resolve(None, is_cuda=True, env={dispatch.ENV_VAR: "cuda"})
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.resolve("fast", is_cuda=False, env={})


def test_m_bucket():
    assert [dispatch.m_bucket(m) for m in (0, 1, 2, 3, 512, 513, 8704)] == [1, 1, 2, 4, 512, 1024, 16384]


# -- the GPU-only paths, with a fake torch.cuda --------------------------------------------------------------

class FakeCuda:
    """torch.cuda's device guard, current device, streams, events and capture state on the CPU. The
    current device is a number the fake guard sets and restores; each event logs the device of the
    stream it was recorded on (an event recorded without a stream is on the current device's)."""

    def __init__(self, monkeypatch, current: int = 0, capturing: bool = False):
        self.current, self.capturing, self.recorded_on = current, capturing, []
        for name in ("device", "current_device", "current_stream", "Event", "is_current_stream_capturing"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))

    @contextlib.contextmanager
    def device(self, device):
        previous, self.current = self.current, torch.device(device).index
        try:
            yield
        finally:
            self.current = previous

    def current_device(self):
        return self.current

    def current_stream(self, device=None):
        return SimpleNamespace(device_index=self.current if device is None else torch.device(device).index)

    def is_current_stream_capturing(self):
        return self.capturing

    def Event(self, enable_timing=False):
        cuda = self

        class FakeEvent:
            def record(self, stream=None):
                cuda.recorded_on.append(cuda.current if stream is None else stream.device_index)

            def synchronize(self):
                pass

            def elapsed_time(self, end):
                return 1.0

        return FakeEvent()


GPU1 = torch.device("cuda", 1)


def test_every_call_and_timing_runs_on_the_inputs_device(tmp_path, monkeypatch):
    """Inputs on cuda:1 while the current device is 0 (infer.py --device cuda:1): the check, every timed
    sample, its events and L2 flush, later calls and the first call after a disk hit all run on device 1."""
    cuda = FakeCuda(monkeypatch, current=0)
    ref = Candidates(None).reference
    ran_on, flushed_on = [], []  # the current device at each call of the paths, at each flush

    def compute(backend):
        ran_on.append(cuda.current)
        return ref

    path = tmp_path / "lora_dispatch.json"
    first = Dispatcher(path, flush=lambda device: flushed_on.append(cuda.current))  # CUDA-event timer
    first.run(KEY, compute, TOL, GPU1)
    first.run(KEY, compute, TOL, GPU1)
    Dispatcher(path).run(KEY, compute, TOL, GPU1)  # a new process: the disk's choice
    samples = len(flushed_on)
    assert samples >= 2 * dispatch.MIN_REPS and len(ran_on) == 2 + samples + 2  # check, samples, 2 later calls
    assert set(ran_on) == set(flushed_on) == {1}
    assert len(cuda.recorded_on) == 2 * samples and set(cuda.recorded_on) == {1}  # start and end of each
    assert cuda.current == 0  # the guard restores the caller's device


def test_masked_lora_launches_under_a_guard_for_the_inputs_device(fresh_dispatcher, monkeypatch):
    """Forced Triton and auto, forward and backward, with and without adapters: every launch of the Triton
    path runs inside dispatch.on_device(x.device) (recorded by wrapping the guard)."""
    guards, launches = [], []
    real_guard, real_launch = dispatch.on_device, masked_lora_triton.masked_lora

    @contextlib.contextmanager
    def recording_guard(device):
        guards.append(device)
        with real_guard(device):
            yield
        guards.pop()

    def launch(*args, **kwargs):
        launches.append(list(guards))
        return real_launch(*args, **kwargs)

    monkeypatch.setattr(dispatch, "on_device", recording_guard)
    monkeypatch.setattr(masked_lora_triton, "masked_lora", launch)
    x, weight, bias, lora_a, lora_b, scale = slider_inputs()
    w8, w_scale = fp8_weight(weight)
    x.requires_grad_(True)
    for backend in ("triton", "auto"):
        masked_lora_linear(x, weight, bias, lora_a, lora_b, scale, backend=backend).sum().backward()
        fp8_linear(x, w8, w_scale, None, backend=backend).sum().backward()
    assert len(launches) >= 8 and all(guard and set(guard) == {x.device} for guard in launches)


class FailsFrom(Candidates):
    """Triton's outputs are right until its `n`-th call, which raises `error` (n = 2: the first timed sample)."""

    def __init__(self, clock, error, n):
        super().__init__(clock)
        self.error, self.n = error, n

    def __call__(self, backend):
        out = super().__call__(backend)
        if backend == "triton" and self.calls.count("triton") >= self.n:
            raise self.error
        return out


def build_error(kind: str) -> Exception:
    """Triton's build failures, as Triton raises them (a compile error's text starts with the source)."""
    if kind == "compile error":
        node = ast.parse("w = tl.load(w_ptrs)").body[0]
        reason = "ValueError('type fp8e4nv not supported in this architecture')"
        return CompilationError("w = tl.load(w_ptrs)", node, reason)
    if kind == "out of shared memory":
        return OutOfResources(262144, 101376, "shared memory")
    return PTXASError("ptxas fatal: too many resources requested")


REPEATING = {"compile error": "fp8e4nv not supported", "out of shared memory": "Required: 262144",
             "ptxas": "too many resources"}
TRANSIENT = {
    "out of memory while timing": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    "capture": RuntimeError("CUDA error: operation not permitted when stream is capturing"),
    "launch": RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered"),
}


@pytest.mark.parametrize("failure", ["disagrees", *REPEATING, *TRANSIENT])
def test_only_failures_that_repeat_are_saved(tmp_path, failure):
    """A disagreement or a Triton build failure is saved: the next process takes PyTorch without trying.
    Out of memory, a capture or a launch error keeps PyTorch in this process only; the next one measures
    again (here the Triton path works there, and wins)."""
    d, clock = make(tmp_path, triton_s=1e-6)
    if failure == "disagrees":
        cands = Candidates(clock, triton=wrong_by(Candidates(None).reference, 100.0))
    elif failure in REPEATING:
        cands = Candidates(clock, triton=build_error(failure))
    else:
        cands = FailsFrom(clock, TRANSIENT[failure], n=2 if failure.endswith("timing") else 1)
    saved = failure not in TRANSIENT
    with pytest.warns(RuntimeWarning) as caught:
        assert d.run(KEY, cands, TOL, CPU) is cands.reference
    (message,) = [str(w.message) for w in caught]
    assert ("in this process" in message) != saved
    assert REPEATING.get(failure, "") in message  # the reason, not the source excerpt
    assert (d.decisions()[0].backend, d.decisions()[0].transient) == ("torch", not saved)

    later, clock2 = make(tmp_path, triton_s=1e-6)  # the next process, where Triton works
    again = Candidates(clock2)
    later.run(KEY, again, TOL, CPU)
    (decision,) = later.decisions()
    if saved:
        assert (decision.backend, decision.source, again.calls) == ("torch", "disk", ["torch"])
    else:
        assert (decision.backend, decision.source) == ("triton", "measured")


@pytest.mark.parametrize("failure", ["compile error", "launch"])
def test_a_triton_failure_on_a_decided_key_hands_it_to_torch(tmp_path, failure):
    """A key decided for Triton whose later call fails (a new M specialisation that does not build, a
    launch error): that call and the next ones get the PyTorch path, with one warning; saved if it repeats."""
    d, clock = make(tmp_path)
    cands = Candidates(clock)
    d.run(KEY, cands, TOL, CPU)
    cands.triton = build_error(failure) if failure in REPEATING else TRANSIENT[failure]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = [d.run(KEY, cands, TOL, CPU) for _ in range(2)]
    assert len(caught) == 1 and all(out is cands.reference for out in outputs)
    stored = json.loads(d.cache_path.read_text())["sections"][dispatch.versions()][KEY.text()]["backend"]
    assert stored == ("torch" if failure in REPEATING else "triton")


@pytest.mark.parametrize("failure", ["compile error", "launch"])
def test_the_first_call_after_a_disk_hit_is_error_handled(tmp_path, failure):
    """A choice read from disk autotunes and compiles on its first call: a failure there falls back to
    PyTorch with one warning and is recorded like a failure while measuring (saved only if it repeats)."""
    d, clock = make(tmp_path)
    d.run(KEY, Candidates(clock), TOL, CPU)  # "triton" on disk

    later = Dispatcher(d.cache_path)
    cands = Candidates(None, triton=build_error(failure) if failure in REPEATING else TRANSIENT[failure])
    with pytest.warns(RuntimeWarning, match="Triton path is not used") as caught:
        assert later.run(KEY, cands, TOL, CPU) is cands.reference
        assert later.run(KEY, cands, TOL, CPU) is cands.reference
    assert len(caught) == 1 and cands.calls == ["triton", "torch", "torch"]

    third = Dispatcher(d.cache_path)
    third.run(KEY, Candidates(None), TOL, CPU)
    assert third.decisions()[0].backend == ("torch" if failure in REPEATING else "triton")


def test_the_first_call_after_a_disk_hit_holds_the_lock(tmp_path):
    """While one thread makes the first call of a choice read from disk (Triton autotunes there), another
    thread's call of the same key waits for it: it must not run the Triton path beside the autotuner."""
    d, clock = make(tmp_path)
    d.run(KEY, Candidates(clock), TOL, CPU)
    later = Dispatcher(d.cache_path)
    log, other = [], []

    def first_call(backend):
        log.append("first call starts")
        thread = threading.Thread(target=lambda: other.append(later.run(KEY, second_call, TOL, CPU)))
        thread.start()
        thread.join(timeout=2)  # a call that does not wait for the lock is done by now
        log.append("first call ends")
        other.append(thread)
        return Candidates(None).reference

    def second_call(backend):
        log.append(f"second call ({backend})")
        return Candidates(None).reference

    later.run(KEY, first_call, TOL, CPU)
    other[-1].join()
    assert log == ["first call starts", "first call ends", "second call (triton)"]


def test_no_measurement_while_a_cuda_graph_is_captured(tmp_path, monkeypatch):
    """During a capture an undecided key takes the PyTorch path: no check, no timing (both synchronise),
    nothing recorded or saved; it is decided on the first call outside a capture. A key decided in this
    process keeps its choice inside a capture; one only read from disk waits for its first call outside."""
    cuda = FakeCuda(monkeypatch, capturing=True)
    gpu = torch.device("cuda", 0)
    d, clock = make(tmp_path)
    cands = Candidates(clock)
    assert d.run(KEY, cands, TOL, gpu) is cands.reference
    assert (cands.calls, clock.calls, d.decisions(), d.cache_path.exists()) == (["torch"], ["torch"], [], False)

    cuda.capturing = False
    d.run(KEY, cands, TOL, gpu)
    assert d.decisions()[0].backend == "triton"
    cuda.capturing = True
    cands.calls.clear()
    d.run(KEY, cands, TOL, gpu)
    assert cands.calls == ["triton"]

    from_disk = Dispatcher(d.cache_path)
    cands.calls.clear()
    from_disk.run(KEY, cands, TOL, gpu)
    assert cands.calls == ["torch"] and from_disk.decisions() == []


@pytest.mark.parametrize("change", ["kernels", "driver"])
def test_an_edited_kernel_or_a_new_driver_re_verifies_a_cached_choice(tmp_path, monkeypatch, change):
    """A "triton" entry saved before an edit of kernels/*.py (or under another CUDA driver) is not trusted:
    the next process checks again, and here the edited kernel is wrong, so it gets PyTorch."""
    d, clock = make(tmp_path)
    d.run(KEY, Candidates(clock), TOL, CPU)
    assert d.decisions()[0].backend == "triton"
    if change == "kernels":
        monkeypatch.setattr(dispatch, "kernels_source_hash", lambda: "0123456789abcdef")
    else:
        monkeypatch.setattr(dispatch, "cuda_driver_version", lambda: "99999")
    later, clock2 = make(tmp_path)
    broken = Candidates(clock2, triton=wrong_by(Candidates(None).reference, 100.0))
    with pytest.warns(RuntimeWarning, match="max \\|triton - torch\\|"):
        assert later.run(KEY, broken, TOL, CPU) is broken.reference


def test_the_kernels_source_hash_follows_every_kernel_file(tmp_path):
    kernels_dir = Path(dispatch.__file__).parent
    copy = tmp_path / "kernels"
    shutil.copytree(kernels_dir, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert dispatch.kernels_source_hash(copy) == dispatch.kernels_source_hash()  # the kernels' folder, by default
    assert f"kernels {dispatch.kernels_source_hash()}" in dispatch.versions()
    hashes = {dispatch.kernels_source_hash(copy)}
    for name in sorted(p.name for p in copy.glob("*.py")):
        edited = tmp_path / f"edited_{name}"
        shutil.copytree(copy, edited)
        (edited / name).write_text((edited / name).read_text() + "\n# edited\n")
        hashes.add(dispatch.kernels_source_hash(edited))
    assert len(hashes) == 1 + len(list(copy.glob("*.py")))


def test_versions_name_the_cuda_driver(monkeypatch):
    """cuDriverGetVersion, read through ctypes once (torch does not report the driver)."""

    class FakeLibcuda:
        def cuDriverGetVersion(self, version):
            version._obj.value = 12040
            return 0

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibcuda())
    dispatch.cuda_driver_version.cache_clear()
    try:
        assert dispatch.cuda_driver_version() == "12040"
        assert "| driver 12040 |" in dispatch.versions()
    finally:
        dispatch.cuda_driver_version.cache_clear()


# -- masked_lora_linear(backend="auto") through the real kernels (interpreter) ----------------------------

@pytest.fixture
def fresh_dispatcher(tmp_path):
    """The process-wide dispatcher replaced by one with a fake clock (Triton faster) and a temp cache."""
    timed = []

    def timer(fn, device):
        timed.append(fn)
        fn()
        return 1e-3 if len(timed) % 2 else 2e-3  # rounds run triton first, then torch

    d = Dispatcher(tmp_path / "lora_dispatch.json", timer=timer, flush=lambda device: None, reps=1)
    previous = dispatch.use_dispatcher(d)
    yield d
    dispatch.use_dispatcher(previous)


def slider_inputs(dtype=torch.bfloat16, M=40, d_in=40, d_out=36, K=2, r=4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, d_in, generator=g).to(dtype)
    weight = (torch.randn(d_out, d_in, generator=g) / d_in**0.5).to(dtype)
    bias = torch.randn(d_out, generator=g).to(dtype)
    lora_a = torch.randn(K * r, d_in, generator=g) / d_in**0.5
    lora_b = torch.randn(d_out, K * r, generator=g) / (K * r) ** 0.5
    scale = torch.randn(M, K, generator=g)
    return x, weight, bias, lora_a, lora_b, scale


def test_auto_decides_forward_and_backward_once_each(fresh_dispatcher):
    x, weight, bias, lora_a, lora_b, scale = slider_inputs()
    x.requires_grad_(True)
    y = masked_lora_linear(x, weight, bias, lora_a, lora_b, scale, backend="auto")
    y.backward(torch.ones_like(y))
    ops = sorted(r["op"] for r in dispatch.decisions())
    assert ops == ["backward_dx", "forward"]
    assert all(r["backend"] == "triton" and r["reason"] == "faster" for r in dispatch.decisions())
    record = next(r for r in dispatch.decisions() if r["op"] == "forward")
    assert (record["n"], record["d"], record["stacked_rank"], record["m_bucket"]) == (36, 40, 8, 64)
    assert (record["x_dtype"], record["weight_dtype"], record["adapter_dtype"]) == ("bfloat16", "bfloat16", "float32")

    # The chosen path's result, exactly (the same kernels on the same shapes).
    x2 = x.detach().requires_grad_(True)
    y_triton = masked_lora_linear(x2, weight, bias, lora_a, lora_b, scale, backend="triton")
    y_triton.backward(torch.ones_like(y_triton))
    assert torch.equal(y, y_triton) and torch.equal(x.grad, x2.grad)


def test_auto_leaves_a_wrong_kernel_for_torch(fresh_dispatcher, monkeypatch):
    real = masked_lora_triton.fused_linear
    monkeypatch.setattr(masked_lora_triton, "fused_linear", lambda *a: real(*a) * 1.25)
    inputs = slider_inputs()
    with pytest.warns(RuntimeWarning, match="forward.*max \\|triton - torch\\|"):
        y = masked_lora_linear(*inputs, backend="auto")
    assert torch.equal(y, masked_lora_linear(*inputs, backend="torch"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        masked_lora_linear(*inputs, backend="auto")  # decided: no second warning


def test_auto_sends_fp32_and_large_stacks_to_torch_unmeasured(fresh_dispatcher, monkeypatch):
    def fail(*args):
        raise AssertionError("auto ran the Triton path")

    monkeypatch.setattr(masked_lora_triton, "scaled_shrink", fail)
    masked_lora_linear(*slider_inputs(torch.float32), backend="auto")
    masked_lora_linear(*slider_inputs(K=3, r=44), backend="auto")  # K*r = 132 > 128
    assert dispatch.decisions() == []


def test_env_override_does_not_apply_to_cpu_tensors(fresh_dispatcher, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    monkeypatch.setattr(masked_lora_triton, "fused_linear", lambda *a: pytest.fail("triton ran on CPU tensors"))
    masked_lora_linear(*slider_inputs())
    assert dispatch.decisions() == []


def fp8_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight as float8_e4m3fn with one fp32 scale per output row."""
    w_scale = weight.float().abs().amax(1) / 448
    return (weight.float() / w_scale[:, None]).to(torch.float8_e4m3fn), w_scale


def test_auto_guards_the_fp8_paths(fresh_dispatcher):
    x, weight, bias, lora_a, lora_b, scale = slider_inputs()
    w8, w_scale = fp8_weight(weight)
    x.requires_grad_(True)
    masked_lora_linear(x, w8, bias, lora_a, lora_b, scale, backend="auto", weight_scale=w_scale).sum().backward()
    fp8_linear(x, w8, w_scale, None, backend="auto").sum().backward()
    records = {(r["op"], r["stacked_rank"], r["extras"]): r for r in dispatch.decisions()}
    assert set(records) == {("forward", 8, "bias,scale"), ("backward_dx", 8, "scale"),
                            ("forward", 0, "scale"), ("backward_dx", 0, "scale")}
    assert all(r["weight_dtype"] == "float8_e4m3fn" and r["backend"] == "triton" for r in records.values())


def test_bf16_and_fp16_activations_get_separate_decisions(fresh_dispatcher, monkeypatch):
    """Against one fp8 weight, bf16 and fp16 x build different kernels: a Triton path chosen for bf16
    must not be reused, unchecked, for fp16 (here it is right for bf16 and wrong for fp16)."""
    x, weight, *_ = slider_inputs()
    w8, w_scale = fp8_weight(weight)
    real = masked_lora_triton.fused_linear
    monkeypatch.setattr(masked_lora_triton, "fused_linear",
                        lambda x, *a: real(x, *a) * (1.25 if x.dtype == torch.float16 else 1.0))
    fp8_linear(x, w8, w_scale, None, backend="auto")
    x16 = x.half()
    with pytest.warns(RuntimeWarning, match="\\|float16\\|.*max \\|triton - torch\\|"):
        y16 = fp8_linear(x16, w8, w_scale, None, backend="auto")
    assert torch.equal(y16, fp8_linear(x16, w8, w_scale, None, backend="torch"))
    assert sorted((r["x_dtype"], r["backend"]) for r in dispatch.decisions()) == [("bfloat16", "triton"),
                                                                                  ("float16", "torch")]


def test_compiled_blocks_call_the_dispatch_without_graph_breaks(fresh_dispatcher):
    """torch.compile over fp8_linear and masked_lora_linear with the dispatch on (backend "auto", what
    backend=None is on CUDA): no graph break; the dispatcher decides when the graph runs, outside it
    (both keys measured here), and the compiled forward and backward equal the eager ones."""
    x, weight, bias, lora_a, lora_b, scale = slider_inputs()
    w8, w_scale = fp8_weight(weight)

    def block(x):
        return (fp8_linear(x, w8, w_scale, bias, backend="auto")
                + masked_lora_linear(x, weight, bias, lora_a, lora_b, scale, backend="auto"))

    explanation = torch._dynamo.explain(block)(x)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert {r["op"] for r in dispatch.decisions()} == {"forward"} and len(dispatch.decisions()) == 2

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y1, y2 = compiled(x1), block(x2)
    y1.sum().backward()
    y2.sum().backward()
    assert torch.equal(y1, y2) and torch.equal(x1.grad, x2.grad)


@pytest.mark.parametrize("need_y", [True, False])
def test_the_compiled_graphs_op_matches_its_shapes_and_dtypes(fresh_dispatcher, need_y):
    """The op a compiled graph calls (slideredit::masked_lora) returns what its fake, which the graph is
    traced with, promises, whichever backend the dispatcher picks (here Triton, whose H~ is fp32 inside):
    torch.library.opcheck's schema, fake-tensor and AOT checks."""
    from slideredit.kernels import masked_lora

    x, weight, bias, lora_a, lora_b, scale = slider_inputs()  # (opcheck's schema check fails on fp8 weights)
    args = ("auto", "forward", x, weight, bias, lora_a, lora_b, scale, 4)
    torch.library.opcheck(masked_lora._outside_the_graph, args, {"need_y": need_y})
    assert [r["backend"] for r in dispatch.decisions()] == ["triton"]
