"""Data parallelism: `torchrun --nproc_per_node 2 train.py` (gloo, CPU) trains the same adapter as one process
with the same global batch, and only rank 0 writes; gradient accumulation is the same global batch too."""
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from slideredit.sliders import STLORA
from slideredit.training import train
from slideredit.training.checkpoints import checkpoints
from test_train_script import adapter_file, faces, make_config, short_model_dir  # noqa: F401 (fixtures)
from test_training_losses import one_thread  # noqa: F401 (autouse fixture)

REPO = Path(__file__).resolve().parents[1]


def assert_close_adapters(a: Path, b: Path, method: str) -> None:
    """Same samples, same math; only the order of float additions differs (a batch of 2 in one GEMM vs
    two batches of 1 averaged by all-reduce or accumulated)."""
    ta, tb = adapter_file(a, method), adapter_file(b, method)
    assert ta.keys() == tb.keys()
    for name in ta:
        torch.testing.assert_close(ta[name], tb[name], rtol=1e-5, atol=1e-6, msg=name)


def test_two_processes_train_like_one_with_the_same_global_batch(short_model_dir, faces, tmp_path):
    config = make_config(short_model_dir, tmp_path / "ddp", faces, method=STLORA, train_batch_size=1,
                         max_train_steps=2, checkpointing_steps=2)
    config_file = tmp_path / "ddp.yaml"
    config_file.write_text(yaml.safe_dump(config.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(REPO / "train.py"), "--config", str(config_file)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]

    train(make_config(short_model_dir, tmp_path / "single", faces, method=STLORA, train_batch_size=2,
                      max_train_steps=2, checkpointing_steps=2))
    assert_close_adapters(tmp_path / "ddp", tmp_path / "single", STLORA)
    assert_close_adapters(tmp_path / "ddp" / "checkpoint-2", tmp_path / "single" / "checkpoint-2", STLORA)

    out = tmp_path / "ddp"
    assert [step for step, _ in checkpoints(out)] == [2]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    log = (out / "train.log").read_text()
    assert log.count("INFO saved ") == 1  # rank 0 alone logs and writes
    assert "global batch 2 = 1 per process x 2 process(es)" in log


def test_gradient_accumulation_is_the_same_global_batch(short_model_dir, faces, tmp_path):
    train(make_config(short_model_dir, tmp_path / "accumulated", faces, train_batch_size=1,
                      gradient_accumulation_steps=2, max_train_steps=2))
    train(make_config(short_model_dir, tmp_path / "batched", faces, train_batch_size=2, max_train_steps=2))
    assert_close_adapters(tmp_path / "accumulated", tmp_path / "batched", "gstlora")
