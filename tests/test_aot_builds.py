"""benchmarks/aot_builds.py: the kernels built ahead of time for GPUs on this CPU, with Triton's ptxas.

One quick run for sm_89 (the 99 KB card with native fp8: ten builds, one per kernel and weight dtype)
checks the JSON and the pruning's estimates against real builds, seven builds at the edges of the spill
table check that the pruning keeps exactly the ones that do not spill; the rest are the script's pure parts.
The full grid (`--arch 80 86 89 90`, some 500 builds) is for kernel changes, not CI.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import aot_builds  # noqa: E402

from slideredit.kernels import masked_lora_triton as T  # noqa: E402

KEYS = {"arch", "kernel", "weight_dtype", "config", "kept", "ok", "error", "registers", "spill_bytes", "shared_bytes",
        "smem_limit", "mma", "wgmma_in_flight", "wgmma_serialized"}
FAMILIES = {("gemm_forward", "bfloat16"), ("gemm_forward", "float8_e4m3fn"), ("gemm_dx", "bfloat16"),
            ("gemm_dx", "float8_e4m3fn"), ("shrink_forward", "bfloat16"), ("shrink_forward", "float32"),
            ("shrink_backward", "bfloat16"), ("shrink_backward", "float32"), ("fp8_linear_forward", "float8_e4m3fn"),
            ("fp8_linear_dx", "float8_e4m3fn")}


@pytest.fixture(scope="module")
def quick_sm89(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "builds.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "aot_builds.py"), "--arch", "89", "--quick",
                          "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return run, json.loads(out.read_text()) if out.exists() else None


def test_quick_run_builds_one_kept_config_per_kernel_family(quick_sm89):
    run, rows = quick_sm89
    assert run.returncode == 0, run.stderr[-3000:]
    assert {(r["kernel"], r["weight_dtype"]) for r in rows} == FAMILIES and len(rows) == len(FAMILIES)
    for row in rows:
        assert set(row) == KEYS
        assert row["arch"] == 89 and row["kept"] and row["ok"] and row["error"] is None
        assert row["smem_limit"] == 101_376 and 0 < row["shared_bytes"] <= row["smem_limit"]
        assert 0 < row["registers"] <= 255 and row["spill_bytes"] == 0
        assert row["mma"] == "mma.sync"  # sm_89 has no wgmma
        assert row["wgmma_in_flight"] is None and row["wgmma_serialized"] is None
        assert {"BLOCK_M", "BLOCK_D", "num_warps", "num_stages", "adapter_dtype", "stacked_rank", "tokens"} <= set(
            row["config"])
    # one build each, but the summary counts every tile the pruning keeps: all five bf16 GEMM tiles fit a
    # 4090's 99 KB (the sm_90 estimate kept two), three of the fp8 dX tiles (two spill)
    assert "| sm_89 | gemm_forward | bfloat16 | 5 / 5 | 1 / 1 | 1 |" in run.stdout
    assert "| sm_89 | gemm_dx | float8_e4m3fn | 3 / 5 | 1 / 1 | 1 |" in run.stdout


def test_h100_fp8_loops_keep_one_wgmma_in_flight(tmp_path):
    """The fp8 GEMMs on sm_90 swap their operands (W converted in registers, wgmma's first operand), so
    their main loops keep one wgmma in flight, as bf16's do, and ptxas does not serialize them."""
    out = tmp_path / "fp8.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "aot_builds.py"), "--arch", "90", "--quick",
                          "--weight-dtype", "float8_e4m3fn", "--require-wgmma-in-flight", "--json", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {r["kernel"] for r in rows} == {"gemm_forward", "gemm_dx", "fp8_linear_forward", "fp8_linear_dx"}
    for built in rows:
        assert built["mma"] == "wgmma" and built["wgmma_in_flight"] == 1 and built["wgmma_serialized"] is False
        assert built["spill_bytes"] == 0


def independent_estimate(row: dict) -> int:
    """The pruning's estimate for a row, rebuilt from the row alone (x is bf16 in the grid)."""
    c = row["config"]
    config = triton.Config({k: c[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D") if k in c}, num_warps=c["num_warps"],
                           num_stages=c["num_stages"])
    block_r = max(16, triton.next_power_of_2(c["stacked_rank"] or 1))
    operand = getattr(torch, row["weight_dtype"])
    if row["kernel"].startswith("shrink"):
        return T.shrink_smem_bytes(config, row["arch"], block_r, torch.bfloat16, operand)
    w_scale = T.W_SCALE_NONE if operand == torch.bfloat16 else (
        T.W_SCALE_REDUCTION if row["kernel"].endswith("_dx") else T.W_SCALE_OUTPUTS)
    return T.gemm_smem_bytes(config, row["arch"], block_r, torch.bfloat16, operand, w_scale.value)


def test_quick_builds_need_exactly_the_shared_memory_the_pruning_estimates(quick_sm89):
    _, rows = quick_sm89
    assert [independent_estimate(r) for r in rows] == [r["shared_bytes"] for r in rows]
    assert "note:" not in quick_sm89[0].stderr  # the script's own check agrees


# The spill table's edges (kernels/masked_lora_triton.py's SPILLS_FROM, SPILLING_BUILDS), built for real:
# (arch, kernel, GEMM config index, stacked rank, adapter dtype, whether the build spills); fp8 weights.
EDGE_BUILDS = [
    (80, "gemm_forward", 2, 32, "bfloat16", True),  # 128x128, 4 warps: 255 registers, a 4-byte spill
    (80, "gemm_forward", 2, 32, "float32", False),  # its sibling: 255 registers, none
    (89, "gemm_forward", 4, 16, "bfloat16", True),  # 128x64: 168 registers, a 4-byte spill
    (89, "gemm_forward", 4, 16, "float32", False),
    (80, "gemm_dx", 2, 32, "bfloat16", False),  # 254 registers: kept
    (86, "gemm_dx", 2, 32, "bfloat16", True),  # 255 registers, 32 B
    (86, "fp8_linear_dx", 2, None, None, False),  # 250 registers: kept
]
EDGE_SCRIPT = """
import json, sys
import torch
import aot_builds as A
from slideredit.kernels import masked_lora_triton as T
rows = []
for arch, kernel, index, rank, adapters, _ in json.loads(sys.argv[1]):
    target = T.GpuTarget(arch, T.SMEM_LIMITS[arch])
    launches = A._record_layer(target, 3072, 3072, A.TOKENS, torch.float8_e4m3fn, adapters and getattr(torch, adapters),
                               rank, backward=True)
    launch = next(ln for ln in launches if ln.kernel == kernel)
    config = T.GPU_GEMM_CONFIGS[index]
    rows.append(A.build(launch, config, any(config is kept for kept in launch.kept())))
print(json.dumps(rows))
"""


@pytest.fixture(scope="module")
def edge_builds():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "benchmarks"), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", EDGE_SCRIPT, json.dumps(EDGE_BUILDS)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


@pytest.mark.parametrize("position", range(len(EDGE_BUILDS)))
def test_the_pruning_keeps_a_build_exactly_when_it_does_not_spill(edge_builds, position):
    arch, kernel, _, _, _, spills = EDGE_BUILDS[position]
    built = edge_builds[position]
    assert (built["arch"], built["kernel"], built["ok"]) == (arch, kernel, True)
    assert (built["spill_bytes"] > 0) == spills and built["kept"] == (not spills)
    assert 0 < built["registers"] <= 255


def row(**fields) -> dict:
    base = {"arch": 89, "kernel": "gemm_dx", "weight_dtype": "float8_e4m3fn", "kept": True, "ok": True, "error": None,
            "registers": 200, "spill_bytes": 0, "shared_bytes": 70_000, "smem_limit": 101_376, "mma": "mma.sync",
            "wgmma_in_flight": None, "wgmma_serialized": None,
            "config": {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_D": 64, "num_warps": 4, "num_stages": 4,
                       "adapter_dtype": "float32", "stacked_rank": 32, "tokens": 8704}}
    return {**base, **fields}


def test_problems_are_the_kept_builds_that_fail_spill_or_overflow():
    rows = [row(), row(ok=False, error="CompilationError: type fp8e4nv not supported"), row(spill_bytes=104),
            row(shared_bytes=101_377), row(kept=False, spill_bytes=68), row(kept=False, shared_bytes=200_000)]
    found = aot_builds.problems(rows)
    assert len(found) == 3
    assert "does not compile: CompilationError: type fp8e4nv not supported" in found[0]
    assert "spills 104 bytes" in found[1] and "needs 101377 B" in found[2]
    assert all(text.startswith("sm_89 gemm_dx float8_e4m3fn 128x128x64 w4 s4 K*r=32 float32") for text in found)


def test_model_notes_flag_a_wrong_estimate_and_a_tile_pruned_for_nothing():
    assert aot_builds.model_notes(row(), 70_000) == []
    assert "estimates 65536 B of shared memory, the build needs 70000" in aot_builds.model_notes(row(), 65_536)[0]
    assert "pruned, though it compiles" in aot_builds.model_notes(row(kept=False), 70_000)[0]
    assert aot_builds.model_notes(row(kept=False, spill_bytes=4), 70_000) == []
    assert aot_builds.model_notes(row(ok=False), 0) == []


PTX_LOOP = """
$L__BB0_5:                              // =>This Inner Loop Header: Depth=1
	cp.async.wait_group 	2;
	wgmma.fence.sync.aligned;
	wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {%r1}, {%r2}, %rd3, %p4, 1, 1, 0;
	wgmma.commit_group.sync.aligned;
	wgmma.wait_group.sync.aligned {wait};
	@%p45 bra 	$L__BB0_5;
$L__BB0_6:
	wgmma.wait_group.sync.aligned 0;
"""


@pytest.mark.parametrize("wait", [0, 1])
def test_wgmmas_in_flight_reads_the_main_loops_wait(wait):
    prologue = "\twgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%r9}, {%r8}, %rd7, 0, 1, 1, 0;\n" \
               "\twgmma.wait_group.sync.aligned 0;\n\tbra.uni \t$L__BB0_5;\n"  # a forward branch: no loop
    assert aot_builds.wgmmas_in_flight(prologue + PTX_LOOP.replace("{wait}", str(wait))) == wait


def test_wgmmas_in_flight_without_a_wgmma_loop_is_none():
    assert aot_builds.wgmmas_in_flight(PTX_LOOP.replace("wgmma.mma_async", "mma.sync").replace("{wait}", "0")) is None


def test_mma_kind():
    assert aot_builds.mma_kind(PTX_LOOP) == "wgmma"
    assert aot_builds.mma_kind("\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f2};") == \
        "mma.sync"
    assert aot_builds.mma_kind("\tfma.rn.f32 %f1, %f2, %f3, %f4;") == "none"


@pytest.mark.parametrize("flags,message", [
    (["--arch", "75"], "--arch 75: no known shared-memory limit; choose from [80, 86, 89, 90]"),
    (["--arch", "90", "--weight-dtype", "half"], "--weight-dtype half: expected one of"),
    (["--arch", "90", "--kernel", "gemm"], "argument --kernel: invalid choice: 'gemm'"),
])
def test_bad_flags_are_one_line_errors(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        aot_builds.main([*flags, "--json", str(tmp_path / "out.json")])
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_json_folder_must_exist(tmp_path, capsys):
    with pytest.raises(SystemExit):
        aot_builds.main(["--arch", "90", "--json", str(tmp_path / "missing" / "out.json")])
    assert f"--json {tmp_path / 'missing' / 'out.json'}: folder {tmp_path / 'missing'} does not exist" in \
        capsys.readouterr().err


def test_refuses_kernels_imported_for_the_interpreter(tmp_path):
    assert T.INTERPRET  # tests/conftest.py
    with pytest.raises(SystemExit, match="imported with TRITON_INTERPRET=1"):
        aot_builds.main(["--arch", "90", "--json", str(tmp_path / "out.json")])


def test_kernel_and_weight_dtype_select_a_subset():
    launch = lambda kernel, dtype: aot_builds.Launch(T.GpuTarget(89, 101_376), kernel, dtype, None, None, 1, None, (), {})
    launches = [launch("gemm_dx", torch.bfloat16), launch("gemm_dx", torch.float8_e4m3fn),
                launch("fp8_linear_dx", torch.float8_e4m3fn), launch("shrink_forward", torch.float32)]
    assert aot_builds.selected(launches, None, None) == launches
    assert aot_builds.selected(launches, "gemm_dx", None) == launches[:2]
    assert aot_builds.selected(launches, None, "float8_e4m3fn") == launches[1:3]
    assert aot_builds.selected(launches, "gemm_dx", "float8_e4m3fn") == [launches[1]]


def test_summary_counts_tiles_and_builds_per_card_kernel_and_weight():
    rank32 = row()
    rank16 = row(registers=210, shared_bytes=70_500, config={**row()["config"], "stacked_rank": 16})
    pruned = row(kept=False, spill_bytes=104, registers=255, config={**row()["config"], "BLOCK_N": 256, "num_warps": 8})
    failed = row(kernel="gemm_forward", ok=False, error="CompilationError", registers=None, spill_bytes=None,
                 shared_bytes=None, mma=None)
    tiles = {(89, "gemm_dx", "float8_e4m3fn"): (3, 5), (89, "gemm_forward", "float8_e4m3fn"): (5, 5)}
    hopper = row(arch=90, mma="wgmma", smem_limit=232_448, wgmma_in_flight=1, wgmma_serialized=False)
    serial = {**hopper, "config": {**hopper["config"], "stacked_rank": 16}, "wgmma_in_flight": 0}
    tiles[90, "gemm_dx", "float8_e4m3fn"] = (5, 5)
    lines = aot_builds.summary([rank32, rank16, pruned, failed, hopper, serial], tiles)
    assert lines[2:] == [
        "| sm_89 | gemm_dx | float8_e4m3fn | 3 / 5 | 2 / 3 | 2 | 210 | 0 | 70500 / 101376 | mma.sync | - |",
        "| sm_89 | gemm_forward | float8_e4m3fn | 5 / 5 | 1 / 1 | 0 | - | - | - / 101376 | - | - |",
        "| sm_90 | gemm_dx | float8_e4m3fn | 5 / 5 | 2 / 2 | 2 | 200 | 0 | 70000 / 232448 | wgmma | 0 |",
    ]
    lines = aot_builds.summary([{**hopper, "wgmma_serialized": True}], tiles)
    assert lines[2].endswith("| wgmma | 1 serialized |")


def test_require_wgmma_in_flight_flags_kept_wgmma_loops_that_wait_for_each_or_are_serialized():
    wgmma = row(arch=90, mma="wgmma", smem_limit=232_448, wgmma_in_flight=1, wgmma_serialized=False)
    assert aot_builds.serial_wgmma(wgmma) == []
    assert "keeps no wgmma in flight" in aot_builds.serial_wgmma({**wgmma, "wgmma_in_flight": 0})[0]
    assert "ptxas serializes the wgmmas (C7515)" in aot_builds.serial_wgmma({**wgmma, "wgmma_serialized": True})[0]
    assert aot_builds.serial_wgmma({**wgmma, "kept": False, "wgmma_in_flight": 0}) == []
    assert aot_builds.serial_wgmma(row()) == []  # mma.sync: no wgmma to keep in flight
