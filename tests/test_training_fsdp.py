"""FSDP training (`sharding: fsdp`): 2 processes with gloo train the same adapter as one process with the
same global batch, each holding half of the parameters; checkpoints are whole files that one process
resumes; a killed FSDP run resumes exactly, here relaunched as two "nodes" on localhost; fp8 weights
with bf16 train sharded too."""
import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from torch.distributed.tensor import DTensor

from flux_sizes import TINY_FLUX
from slideredit import Flux, load_flux
from slideredit.pipelines import SliderEditFluxKontextPipeline
from slideredit.sliders import STLORA, adapter_parameters, init_adapter
from slideredit.training import train
from slideredit.training.checkpoints import checkpoints
from slideredit.training.distributed import shard_model
from slideredit.training.losses import self_distillation_loss
from test_train_script import (adapter_file, assert_same_tensors, make_config, short_model_dir,  # noqa: F401 (fixture)
                               write_images)
from test_training_distributed import SMOOTH_ADAM, assert_close_adapters
from test_training_losses import fake_batch, one_thread  # noqa: F401 (one_thread: autouse fixture)
from tiny_kontext import randomize_

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
TIMEOUT = 300  # seconds for one launch; a run here takes about 30 s on 2 busy cores
VALIDATION = dict(validation_prompts=["make the hair curly and add a red hat"], validation_steps=2,
                  validation_num_inference_steps=2)
# STLoRA, 2 steps of a global batch of 2, a checkpoint after each, gradient checkpointing on (the default)
RUN = dict(method=STLORA, checkpointing_steps=1, **SMOOTH_ADAM)

# A rank dies in the middle of step 2 (after checkpoint-1 was written), as a killed process would.
DIES_IN_STEP_2 = r"""
import os, runpy, sys
sys.path.insert(0, os.getcwd())  # this checkout's slideredit, as train.py itself imports it
from slideredit.training.loop import Trainer

original = Trainer.train_step

def dies_in_step_2(self):
    if self.step == 1 and self.dist.rank == 1:
        os._exit(9)
    return original(self)

Trainer.train_step = dies_in_step_2
sys.argv[0] = "train.py"
runpy.run_path("train.py", run_name="__main__")
"""

# Each rank reads and writes its own output_dir (the given one + its rank), as nodes without a shared
# filesystem would.
OWN_OUTPUT_DIR = r"""
import os, runpy, sys

sys.path.insert(0, os.getcwd())  # this checkout's slideredit, as train.py itself imports it
sys.argv += ["--output_dir", sys.argv.pop(1) + os.environ["RANK"]]
sys.argv[0] = "train.py"
runpy.run_path("train.py", run_name="__main__")
"""


def write_config(path: Path, config) -> Path:
    path.write_text(yaml.safe_dump(config.to_dict()))
    return path


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 ARGS` from the repository root."""
    return subprocess.run([*TORCHRUN, "--standalone", "--nproc_per_node", "2", *args], cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=TIMEOUT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(*args: str) -> list[tuple[int, str]]:
    """Two torchrun agents of one process each meeting by c10d rendezvous on localhost, as the README's
    two-node command runs on two machines (c10d numbers the nodes as they join); -> (return code,
    stderr) of each."""
    command = [*TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
               "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "--rdzv_id", "fsdp-test", "train.py", *args]
    agents = [subprocess.Popen(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
              for _ in range(2)]
    try:
        errors = [agent.communicate(timeout=TIMEOUT)[1] for agent in agents]
        return [(agent.returncode, error) for agent, error in zip(agents, errors)]
    finally:
        for agent in agents:
            if agent.poll() is None:  # timed out: stop the agent and its workers (its own session)
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait()


@pytest.fixture()
def one_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_block_holds_its_whole_weights_only_while_it_runs(one_process_group):
    """In the teacher pass, the student pass and gradient checkpointing's recomputation, each block is
    gathered for its own forward and resharded after it: while one block runs, every other block holds
    only its shards (one process here, so the shard is the whole tensor, but FSDP's gathering and
    resharding are the same)."""
    model = randomize_(Flux(dataclasses.replace(TINY_FLUX, depth=2, depth_single_blocks=3)), 0).requires_grad_(False)
    init_adapter(model, STLORA, rank=4)
    for p in adapter_parameters(model, STLORA).values():
        p.requires_grad_(True)
    model.gradient_checkpointing = True
    shard_model(model, torch.device("cpu"))
    blocks = [*model.double_blocks, *model.single_blocks]

    def gathered() -> list[int]:  # blocks whose registered parameters are whole tensors, not FSDP shards
        return [i for i, block in enumerate(blocks) if not isinstance(next(block.parameters()), DTensor)]

    seen = []  # (grad enabled, the block running, the blocks gathered), at every layer call
    for i, block in enumerate(blocks):
        for layer in block.modules():
            if not list(layer.children()):
                layer.register_forward_hook(lambda *_, i=i: seen.append((torch.is_grad_enabled(), i, gathered())))
    loss = self_distillation_loss(model, STLORA, fake_batch(STLORA, dtype=torch.float32))
    forward, seen[:] = list(seen), []
    assert gathered() == []
    loss.backward()
    assert gathered() == []

    assert {(grad, i) for grad, i, _ in forward} == {(grad, i) for grad in (False, True) for i in range(5)}
    assert {i for _, i, _ in seen} == set(range(5))  # the recomputation ran every block again
    for grad, i, whole in forward + seen:
        assert whole == [i], f"block {i} running (grad {grad}): blocks {whole} hold their whole weights"
    assert all(p.grad is not None for p in adapter_parameters(model, STLORA).values())


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp") / "faces"
    write_images(folder, 4)
    return folder


@pytest.fixture(scope="module")
def fsdp_run(short_model_dir, images, tmp_path_factory):
    """2 processes x train_batch_size 1, sharded, with a validation grid at step 2: every process must
    render it with rank 0 (each block's forward gathers from all of them)."""
    out = tmp_path_factory.mktemp("fsdp") / "fsdp"
    config = make_config(short_model_dir, out, images, train_batch_size=1, sharding="fsdp", **RUN, **VALIDATION)
    run = torchrun("train.py", "--config", str(write_config(out.parent / "fsdp.yaml", config)))
    assert run.returncode == 0, run.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def single_run(short_model_dir, images, tmp_path_factory):
    """One process x train_batch_size 2: the same global batch."""
    out = tmp_path_factory.mktemp("fsdp") / "single"
    train(make_config(short_model_dir, out, images, train_batch_size=2, **RUN))
    return out


def test_two_sharded_processes_train_like_one_with_the_same_global_batch(fsdp_run, single_run):
    assert_close_adapters(fsdp_run, single_run, STLORA)
    assert_close_adapters(fsdp_run / "checkpoint-1", single_run / "checkpoint-1", STLORA, steps=1)
    assert [step for step, _ in checkpoints(fsdp_run)] == [1, 2]
    assert not [p for p in fsdp_run.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    log = (fsdp_run / "train.log").read_text()
    assert log.count("INFO saved ") == 2  # rank 0 alone logs and writes
    assert (fsdp_run / "validation" / "step-2.png").is_file()


def test_each_process_holds_its_half_of_every_parameter(fsdp_run, short_model_dir):
    """The log's bytes per rank are the rows FSDP gives each rank (dim 0 split as torch.chunk splits it),
    counted here on the unsharded model with its rank-4 STLoRA: about half of the model each."""
    model = load_flux(short_model_dir, dtype=torch.float32)
    init_adapter(model, STLORA, rank=4)
    expected = [0, 0]
    for p in model.parameters():
        rows = [len(chunk) for chunk in torch.arange(p.shape[0]).chunk(2)] + [0]  # too few rows: rank 1 gets none
        row_bytes = p[0].numel() * p.element_size()
        for rank in (0, 1):
            expected[rank] += rows[rank] * row_bytes
    whole = sum(p.numel() * p.element_size() for p in model.parameters())

    line = next(line for line in (fsdp_run / "train.log").read_text().splitlines() if "parameters held" in line)
    held = {int(rank): int(n) for rank, n in re.findall(r"rank (\d) (\d+) bytes", line)}
    assert held == {0: expected[0], 1: expected[1]}, line
    assert "(FSDP shards)" in line and f"the model's parameters: {whole} bytes" in line
    assert all(0.45 * whole < n < 0.55 * whole for n in held.values())


def test_a_sharded_runs_checkpoint_is_the_release_file_and_one_process_resumes_it(fsdp_run, single_run,
                                                                                   short_model_dir, images, tmp_path):
    """The whole adapter loads into the pipeline as it is, and one process (train_batch_size 2: the same
    global batch) continues the 2-process run from checkpoint-1 to where one process alone ends."""
    pipe = SliderEditFluxKontextPipeline.from_pretrained(short_model_dir, torch_dtype=torch.float32)
    pipe.load_stlora(fsdp_run / "checkpoint-1")
    saved = adapter_file(fsdp_run / "checkpoint-1", STLORA)
    loaded = [p.detach() for p in adapter_parameters(pipe.transformer, STLORA).values()]
    assert len(loaded) == len(saved) and all(any(torch.equal(p, t) for t in saved.values()) for p in loaded)

    out = tmp_path / "resumed"
    shutil.copytree(fsdp_run / "checkpoint-1", out / "checkpoint-1")
    result = train(make_config(short_model_dir, out, images, train_batch_size=2, resume_from_checkpoint="latest",
                               **RUN))
    assert result.step == 2 and "resumed from" in (out / "train.log").read_text()
    assert_close_adapters(out, single_run, STLORA)


def test_a_killed_sharded_run_resumes_exactly_on_two_nodes(fsdp_run, short_model_dir, images, tmp_path):
    """A rank dies in step 2; the job resumes from checkpoint-1, launched as two torchrun agents (node
    ranks 0 and 1, c10d rendezvous on localhost) and ends with the uninterrupted run's adapter, bit for
    bit (same processes, same shapes, same kernels)."""
    out = tmp_path / "killed"
    config = make_config(short_model_dir, out, images, train_batch_size=1, sharding="fsdp", **RUN, **VALIDATION)
    dies = tmp_path / "dies_in_step_2.py"
    dies.write_text(DIES_IN_STEP_2)
    killed = torchrun(str(dies), "--config", str(write_config(tmp_path / "killed.yaml", config)))
    assert killed.returncode != 0
    assert [step for step, _ in checkpoints(out)] == [1]

    agents = two_nodes("--config", str(out / "config.yaml"), "--resume", "latest")
    assert [code for code, _ in agents] == [0, 0], agents[0][1][-3000:] + agents[1][1][-3000:]
    assert "resumed from" in (out / "train.log").read_text()
    assert_same_tensors(adapter_file(out, STLORA), adapter_file(fsdp_run, STLORA))
    assert_same_tensors(adapter_file(out / "checkpoint-2", STLORA), adapter_file(fsdp_run / "checkpoint-2", STLORA))


def test_fp8_weights_and_bf16_train_sharded_like_one_process(short_model_dir, images, tmp_path):
    """quantize: fp8 (each rank holds half of every fp8 weight's rows and of its per-row scales) with the
    rest in bf16 and gradient accumulation. One process with train_batch_size 1 and 4 accumulation steps
    computes every sample with the same kernels on the same shapes as each of the 2 ranks; only the
    gradients' sums are grouped differently, so the fp32 bound holds in bf16 too."""
    changes = dict(RUN, quantize="fp8", mixed_precision="bf16", train_batch_size=1)
    config = make_config(short_model_dir, tmp_path / "fsdp", images, gradient_accumulation_steps=2, sharding="fsdp",
                         **changes)
    run = torchrun("train.py", "--config", str(write_config(tmp_path / "fsdp.yaml", config)))
    assert run.returncode == 0, run.stderr[-3000:]
    train(make_config(short_model_dir, tmp_path / "single", images, gradient_accumulation_steps=4, **changes))
    assert_close_adapters(tmp_path / "fsdp", tmp_path / "single", STLORA, global_batch=4)


def test_nodes_that_see_different_checkpoints_refuse_to_resume(fsdp_run, tmp_path):
    """Without a shared output_dir each node would resume from what its own folder holds (here rank 0 from
    checkpoint-1, rank 1 from nothing): one line names what each rank found."""
    shutil.copytree(fsdp_run / "checkpoint-1", tmp_path / "out0" / "checkpoint-1")
    (tmp_path / "out1").mkdir()
    script = tmp_path / "own_output_dir.py"
    script.write_text(OWN_OUTPUT_DIR)
    run = torchrun(str(script), str(tmp_path / "out"), "--config", str(fsdp_run / "config.yaml"),
                   "--resume", "latest")
    assert run.returncode != 0
    assert "error: the processes found different checkpoints to resume from" in run.stderr
    assert "(rank 0: checkpoint-1, rank 1: none)" in run.stderr and "shared filesystem" in run.stderr
    assert [step for step, _ in checkpoints(tmp_path / "out1")] == []  # nothing trained or written
