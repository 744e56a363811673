"""benchmarks/gpu_report.py --smoke: every part of the GPU report runs, at tiny shapes on the CPU."""
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_report  # noqa: E402
from gpu_report_parts import fsdp_memory, kernel_correctness, kernel_timing  # noqa: E402
from gpu_report_parts.setups import Part, smoke_setup  # noqa: E402
from slideredit.memory_plan import PHASES  # noqa: E402

PARTS = ("pipeline_edit", "kernel_correctness", "kernel_timing", "transformer_forward", "training_step", "fsdp_memory")


def test_smoke_report_runs_every_part_and_writes_both_files(tmp_path, capsys):
    parts = gpu_report.main(["--smoke", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "report.json").read_text())
    markdown = (tmp_path / "report.md").read_text()
    printed = capsys.readouterr().out
    assert markdown in printed  # the markdown is printed too
    assert tuple(report["parts"]) == PARTS and report["machine"]["triton interpreter"] is True
    for name, part in parts.items():
        assert f"## {name}: {part['title']}" in markdown
        assert part["rows"], f"part {name} produced no rows: {part['notes']}"
        assert not any(w in note for note in part["notes"] for w in ("time budget", "out of memory", "failed")), \
            part["notes"]

    setup = smoke_setup()
    shapes = len(setup.kernel_tokens) * len(setup.layer_shapes())
    cases = len(setup.ranks) * len(setup.dtypes) * shapes * len(setup.ks)
    fp8_cases = len(setup.dtypes) * shapes  # one rank, K = 2: the low-memory edit's two sliders
    correctness, timing = parts["kernel_correctness"]["rows"], parts["kernel_timing"]["rows"]
    assert len(correctness) == cases + fp8_cases and all(row["ok"] is True for row in correctness)
    fp8_correctness = [row for row in correctness if row["weights"] == "fp8"]
    assert len(fp8_correctness) == fp8_cases and all(row["K"] == 2 and "err dx" in row for row in fp8_correctness)
    assert len(timing) == cases // (len(setup.ranks) * len(setup.dtypes)) + shapes
    assert all("bare ms" in row for row in timing)
    fp8_timing = [row for row in timing if row["weights"] == "fp8"]
    assert len(fp8_timing) == shapes
    for row in fp8_timing:  # each variant timed: "min / median / max" percentages over bare bf16
        for key in ("triton", "triton no adapter", "torch"):
            assert row[f"{key} % over bare (min/med/max)"].count("/") == 2, row
    ours = [row["variant"] for row in parts["transformer_forward"]["rows"] if row["model"] == "ours"]
    assert ours == ["base", "GSTLoRA", "STLoRA", "GSTLoRA + STLoRA"]
    steps = parts["training_step"]["rows"]
    assert len(steps) == 4 and all("/" in row["step ms (min / median / max)"] for row in steps)
    edits = parts["pipeline_edit"]["rows"]
    assert [(row["mode"], row["call"]) for row in edits] == [
        (mode, call) for mode in ("bf16", "fp8 (low-memory mode)") for call in ("first call", "second call")]
    assert all(row["steps"] == setup.edit_steps and row["output finite"] is True for row in edits)
    bf16_edit, fp8_edit = edits[0], edits[2]
    assert bf16_edit["sliders"] == "GSTLoRA" and fp8_edit["sliders"] == "GSTLoRA + STLoRA"
    assert all(row["on every step"] == row["sliders"] for row in edits)  # STLoRA really ran (no tokenizer)
    assert float(fp8_edit["transformer GiB"]) < 0.75 * float(bf16_edit["transformer GiB"])  # fp8 weights resident
    assert "peak GiB" in fp8_edit and any("16 GB goal" in note for note in parts["pipeline_edit"]["notes"])
    assert "fp8 (low-memory mode)" in markdown and "triton no adapter % over bare" in markdown
    assert report["parts"]["pipeline_edit"]["rows"] == edits  # report.json holds the same rows

    # the real model's low-memory edit, planned per phase (meta device), printed first and in the report
    for t5 in ("bf16", "fp8"):
        title = f"planned device memory, FLUX.1 Kontext [dev] low-memory edit (fp8 transformer, T5 {t5}), 1024^2"
        assert printed.index(title) < printed.index("part pipeline_edit")
        peaks = dict(item.split(" ") for item in report["machine"][f"memory plan GB, fp8 1024^2, T5 {t5}"].split(", "))
        assert list(peaks) == list(PHASES) and all(10 < float(gb) < 16 for phase, gb in peaks.items()
                                                   if phase != "text_encoding")
    assert "| denoising | 13.60 | 11.98 | 0.17 | 0.00 |" in printed
    # the low-memory rows: each phase measured (n/a on the CPU) beside the plan of this pipeline
    for row in edits[2:]:
        for phase in PHASES:
            measured, planned = row[f"{phase} GB (measured / plan)"].split(" / ")
            assert measured == "n/a" and float(planned) >= 0
    assert all("text_encoding GB (measured / plan)" not in row for row in edits[:2])


def test_the_low_memory_edit_reads_each_phase_peak_in_order(monkeypatch):
    """PhasePeaks on a smoke edit from a prompt, with a stand-in allocator whose peak counts its reads:
    every phase starts once, in the pipeline's order, and reads its own peak when the next one starts."""
    from gpu_report_parts import pipeline_edit
    from gpu_report_parts.random_models import materialise, random_transformer
    from slideredit.autoencoder import AutoEncoder
    from slideredit.pipelines import EditDefaults, SliderEditFluxKontextPipeline

    setup = smoke_setup()
    reads = []
    monkeypatch.setattr(pipeline_edit, "peak_gib", lambda device: reads.append(device) or len(reads) / 2**30)
    pipe = SliderEditFluxKontextPipeline(
        random_transformer(setup), materialise(lambda: AutoEncoder(setup.autoencoder), "cpu", setup.dtype, seed=3),
        pipeline_edit.random_text_encoders(setup), defaults=EditDefaults(max_sequence_length=setup.text_tokens),
        offload=True, model_offload=True, tiled_decode=True)
    pipe.set_progress_bar_config(disable=True)
    phases = pipeline_edit.PhasePeaks(pipe, "cpu")
    pipe(image=pipeline_edit.edit_inputs(setup).image, prompt="make the square darker", num_inference_steps=2,
         height=32, width=32, auto_resize=False)
    assert phases.finish(load=0) == {"load": 0, "text_encoding": 1.0, "image_encoding": 2.0, "denoising": 3.0,
                                     "decoding": 4.0}
    phases.remove()
    assert "encode_prompt" not in vars(pipe) and not pipe.transformer._forward_pre_hooks


def test_correctness_part_catches_a_wrong_kernel(monkeypatch):
    """kernel_correctness is a check, not a formality: a kernel that drops the low-rank term fails it."""
    from slideredit.kernels.masked_lora import masked_lora_linear

    def no_lora(x, weight, bias, lora_a, lora_b, token_scale, backend=None, weight_scale=None):
        return masked_lora_linear(x, weight, bias, lora_a, 0 * lora_b, token_scale, backend="torch",
                                  weight_scale=weight_scale)

    monkeypatch.setattr(kernel_correctness, "masked_lora_linear", no_lora)
    setup = replace(smoke_setup(), dtypes=(torch.bfloat16,), kernel_tokens=(8,), ks=(2,))
    part = kernel_correctness.measure(setup, deadline=float("inf"))
    assert {row["weights"] for row in part.rows} == {"bf16", "fp8"}  # the fp8 cases are checks too
    assert part.rows and all(row["ok"] is False for row in part.rows)


def test_a_failing_part_becomes_a_note_and_the_report_goes_on():
    def broken(deadline):
        raise RuntimeError("no such kernel\nsecond line")

    part = gpu_report.guarded(broken, float("inf"), "cpu")
    assert part.rows == [] and part.notes[0].startswith("part failed: RuntimeError: no such kernel (")


def test_parts_named_run_alone_in_that_order(tmp_path, monkeypatch):
    """--parts takes names, comma-separated: only those parts run, in the order given, and the kernel parts
    alone build no transformer."""
    ran = []

    def recorded(name):
        def measure(setup, deadline):
            ran.append(name)
            return Part([{"name": name}], [])
        return measure

    for module in (kernel_timing, kernel_correctness):
        monkeypatch.setattr(module, "measure", recorded(module.__name__))
    monkeypatch.setattr(gpu_report, "random_transformer", lambda setup: pytest.fail("built a transformer"))
    parts = gpu_report.main(["--smoke", "--out", str(tmp_path), "--parts", "kernel_timing,kernel_correctness"])
    names = ["gpu_report_parts.kernel_timing", "gpu_report_parts.kernel_correctness"]
    assert ran == names and [part["rows"][0]["name"] for part in parts.values()] == names
    report = json.loads((tmp_path / "report.json").read_text())
    assert list(report["parts"]) == ["kernel_timing", "kernel_correctness"]
    assert "transformer build s" not in report["machine"]


def test_fsdp_memory_alone_on_the_cpu_says_not_measured_and_gives_the_modelled_split(tmp_path, monkeypatch):
    """--parts fsdp_memory on the smoke run builds no transformer and launches no process: a "not measured"
    note, and FLUX.1 Kontext [dev]'s per-rank split for 2/4/8 ranks labelled a model (bf16 weights + an fp32
    STLoRA adapter: about 23.9 GB whole, about 1/N of it per rank)."""
    monkeypatch.setattr(gpu_report, "random_transformer", lambda setup: pytest.fail("built a transformer"))
    monkeypatch.setattr(fsdp_memory, "measure_ranks", lambda *args: pytest.fail("launched processes"))
    parts = gpu_report.main(["--smoke", "--out", str(tmp_path), "--parts", "fsdp_memory"])
    assert list(parts) == ["fsdp_memory"]
    part = parts["fsdp_memory"]
    assert part["notes"][0].startswith("not measured: ")
    assert "not measured" in (tmp_path / "report.md").read_text()
    rows = part["rows"]
    assert [row["ranks"] for row in rows] == [2, 4, 8]
    assert all(row["source"] == "model (from parameter sizes), not measured" for row in rows)
    whole = float(rows[0]["whole model GB"])
    assert 23 < whole < 25
    for row in rows:
        assert whole / row["ranks"] <= row["local parameter bytes"] / 1e9 < 1.01 * whole / row["ranks"]


def test_fsdp_splits_rows_as_torch_chunk_does():
    """Hand-computed: 5 rows over 4 ranks are 2, 2, 1, 0 (ceil(5/4) each, the last rank none); 6 are 2, 2, 2, 0."""
    assert [fsdp_memory.shard_rows(5, 4, r) for r in range(4)] == [2, 2, 1, 0]
    assert [fsdp_memory.shard_rows(6, 4, r) for r in range(4)] == [2, 2, 2, 0]
    layer = torch.nn.Linear(3, 5)  # weight 5 x 3, bias 5; fp32
    assert fsdp_memory.modelled_bytes_per_rank(layer, 4) == [4 * (2 * 3 + 2), 4 * (2 * 3 + 2), 4 * (3 + 1), 0]


def test_the_measured_local_bytes_per_rank_match_the_model():
    """The measuring path itself, on the CPU with gloo: 3 processes shard the smoke transformer with its STLoRA
    adapter (widths of 64 split 22, 22, 20: uneven), run one training step, and each reports the bytes of its
    local shards: exactly the model's split."""
    setup = smoke_setup()
    rows, notes = fsdp_memory.measure_ranks(setup, 3, deadline=float("inf"))
    expected = fsdp_memory.modelled_bytes_per_rank(fsdp_memory.meta_model(setup), 3)
    assert [row["rank"] for row in rows] == [0, 1, 2] and len(set(expected)) > 1
    assert [row["local parameter bytes"] for row in rows] == expected
    assert all(row["source"] == "measured" and float(row["step s"]) > 0 for row in rows), rows


def test_an_unknown_part_name_is_refused_naming_the_flag_and_the_name(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_report.main(["--smoke", "--out", str(tmp_path), "--parts", "kernel_timing,b"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and "--parts" in error and "'b'" in error and "kernel_timing" in error
    assert not (tmp_path / "report.json").exists()
