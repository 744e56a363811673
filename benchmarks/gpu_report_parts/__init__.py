"""The parts of benchmarks/gpu_report.py, one module each, and what they share.

setups         the shapes, repetitions and time budget of a report (real and smoke), and what a part returns
measure        timing and memory helpers
random_models  random weights at real shapes, made on the device, and the inputs of one forward
pipeline_edit, kernel_correctness, kernel_timing, transformer_forward, training_step: the parts.

Imported with benchmarks/ on sys.path (as `python benchmarks/gpu_report.py` and the tests run it), so
bench_lora and bench_step import as top-level modules.
"""
