"""kernels.dispatch: the self-verifying backend choice, all on the CPU.

The dispatcher's seams are its `compute(backend)` callable, its timer and its cache file: here the
candidates are plain tensors (right, wrong, raising), the timer is a fake clock that says which backend
is faster, and the cache lives in a temporary directory. The last tests run masked_lora_linear with
backend="auto" through the real kernels (Triton in the interpreter).
"""
import json
import os
import warnings

import pytest
import torch

from slideredit.kernels import dispatch, masked_lora_triton
from slideredit.kernels.masked_lora import fp8_linear, masked_lora_linear
from slideredit.kernels.dispatch import Dispatcher, Key

KEY = Key("Fake GPU", "forward", "bfloat16", "bfloat16", "float32", 45, 51, 12, 128, "x:row w:row", "bias")
OTHER_KEY = KEY._replace(m_bucket=256)
TOL = dispatch.TOLERANCE[torch.bfloat16]


class FakeClock:
    """timer(fn): runs fn and reports the time set for the backend that fn computes."""

    def __init__(self, seconds: dict[str, float]):
        self.seconds, self.calls = seconds, []

    def __call__(self, fn):
        before = len(self.calls)
        fn()
        assert len(self.calls) == before + 1, "the timer must run exactly one backend call"
        return self.seconds[self.calls[-1]]


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
    return Dispatcher(tmp_path / "cache" / "lora_dispatch.json", timer=clock, **kwargs), clock


def test_faster_backend_wins_and_the_next_call_measures_nothing(tmp_path):
    d, clock = make(tmp_path, triton_s=1e-3, torch_s=3e-3)
    cands = Candidates(clock)
    assert d.run(KEY, cands, TOL) is cands.reference  # the same tensors: the triton fake returns them
    (decision,) = d.decisions()
    assert (decision.backend, decision.reason, decision.source) == ("triton", "faster", "measured")
    assert decision.ms == {"triton": 1.0, "torch": 3.0}
    timed = len(clock.calls)

    cands.calls.clear()
    d.run(KEY, cands, TOL)
    assert cands.calls == ["triton"] and len(clock.calls) == timed + 1  # one call of the winner, untimed


def test_slow_triton_loses(tmp_path):
    d, clock = make(tmp_path, triton_s=5e-3, torch_s=2e-3)
    cands = Candidates(clock)
    d.run(KEY, cands, TOL)
    assert d.decisions()[0].backend == "torch"
    cands.calls.clear()
    d.run(KEY, cands, TOL)
    assert cands.calls == ["torch"]


def test_timing_interleaves_and_stops_at_the_budget(tmp_path):
    d, clock = make(tmp_path, triton_s=0.01, torch_s=0.02, reps=5, budget_s=0.05)
    d.run(KEY, Candidates(clock), TOL)
    # one untimed call each (compile + check), then rounds of (triton, torch) until 0.05 s are spent: 2 rounds
    assert clock.calls == ["torch", "triton"] + ["triton", "torch"] * 2


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
        d.run(KEY, Candidates(clock, triton=wrong_by(ref, factor)), TOL)
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
        d.run(KEY, cands, TOL)
    assert (d.decisions()[0].backend, len(caught)) == (("triton", 0) if agrees else ("torch", 1))


def test_the_check_covers_every_output(tmp_path):
    d, clock = make(tmp_path)
    ref = Candidates(None).reference
    with pytest.warns(RuntimeWarning, match="output 0"):
        d.run(KEY, Candidates(clock, triton=(ref[0] * 1.5, ref[1])), TOL)
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
    triton = {"disagrees": wrong_by(ref, 100.0),
              "compile error": RuntimeError("OutOfResources: shared memory, Required: 262144\nHardware limit: 232448"),
              "launch error": ValueError("an illegal memory access was encountered")}[failure]
    cands = Candidates(clock, triton=triton)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = [d.run(KEY, cands, TOL) for _ in range(3)]
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
        d.run(KEY, cands, TOL)


def test_disk_cache_hit_measures_nothing(tmp_path):
    d, clock = make(tmp_path, triton_s=1e-3, torch_s=3e-3)
    d.run(KEY, Candidates(clock), TOL)

    def no_timing(fn):
        raise AssertionError("a cached key was measured again")

    later = Dispatcher(d.cache_path, timer=no_timing)  # a new process
    cands = Candidates(None)
    later.run(KEY, cands, TOL)
    assert cands.calls == ["triton"]
    (decision,) = later.decisions()
    assert (decision.backend, decision.source, decision.ms) == ("triton", "disk", {"triton": 1.0, "torch": 3.0})


def test_disk_cache_miss_for_another_key_or_other_versions(tmp_path, monkeypatch):
    d, clock = make(tmp_path)
    d.run(KEY, Candidates(clock), TOL)
    other, clock2 = make(tmp_path)
    other.run(OTHER_KEY, Candidates(clock2), TOL)
    assert other.decisions()[0].source == "measured"

    monkeypatch.setattr(dispatch, "versions", lambda: "torch 9.9 | triton 9.9")
    upgraded, clock3 = make(tmp_path)
    upgraded.run(KEY, Candidates(clock3), TOL)
    assert upgraded.decisions()[0].source == "measured"
    sections = json.loads(d.cache_path.read_text())["sections"]
    assert len(sections) == 2 and {KEY.text(), OTHER_KEY.text()} <= set(sections[next(iter(sections))])


def test_processes_merge_their_entries(tmp_path):
    first, c1 = make(tmp_path)
    second, c2 = make(tmp_path)
    second.run(OTHER_KEY._replace(n=1), Candidates(c2), TOL)  # second has read the (empty) file
    first.run(KEY, Candidates(c1), TOL)
    second.run(OTHER_KEY, Candidates(c2), TOL)  # its copy lacks KEY: the write must merge, not overwrite
    entries = json.loads(first.cache_path.read_text())["sections"][dispatch.versions()]
    assert set(entries) == {KEY.text(), OTHER_KEY.text(), OTHER_KEY._replace(n=1).text()}


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"format": 1, "sections": {"x": 3}}', "\udcff"])
def test_corrupt_cache_file_is_ignored_once_and_rewritten(tmp_path, content):
    d, clock = make(tmp_path)
    d.cache_path.parent.mkdir(parents=True)
    d.cache_path.write_bytes(content.encode("utf-8", "surrogateescape"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        d.run(KEY, Candidates(clock), TOL)
        d.run(OTHER_KEY, Candidates(clock), TOL)
    assert len(caught) == 1 and "ignoring the backend cache" in str(caught[0].message)
    data = json.loads(d.cache_path.read_text())
    assert data["format"] == dispatch.CACHE_FORMAT
    assert set(data["sections"][dispatch.versions()]) == {KEY.text(), OTHER_KEY.text()}


def test_cache_file_is_written_atomically_with_the_umask_mode(tmp_path, monkeypatch):
    d, clock = make(tmp_path)
    old = os.umask(0o027)
    try:
        d.run(KEY, Candidates(clock), TOL)
    finally:
        os.umask(old)
    assert d.cache_path.stat().st_mode & 0o777 == 0o640  # what open(path, "w") gives under this umask
    assert os.listdir(d.cache_path.parent) == [d.cache_path.name]  # no temporary file left

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    before = d.cache_path.read_text()
    with pytest.warns(RuntimeWarning, match="cannot write the backend cache"):
        d.run(OTHER_KEY, Candidates(clock), TOL)
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


# -- masked_lora_linear(backend="auto") through the real kernels (interpreter) ----------------------------

@pytest.fixture
def fresh_dispatcher(tmp_path):
    """The process-wide dispatcher replaced by one with a fake clock (Triton faster) and a temp cache."""
    timed = []

    def timer(fn):
        timed.append(fn)
        fn()
        return 1e-3 if len(timed) % 2 else 2e-3  # rounds run triton first, then torch

    d = Dispatcher(tmp_path / "lora_dispatch.json", timer=timer, reps=1)
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
