"""torchrun eval.py / infer.py on the CPU (gloo): the ranks split the cells, rank 0 writes the files one process
writes; a rerun after a kill makes only the missing cells; two "nodes" rendezvous on localhost.

The one-process references run in this process with one thread, as torchrun's ranks do (OMP_NUM_THREADS=1):
the same kernels on the same shapes, so the images are compared byte for byte (with two threads MKL picks
other routines for a few products, and a few pixels of the slider cells differ by one level).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import infer
from slideredit.pipelines import SliderEditFluxKontextPipeline
from interruptions import stop_pipeline_after
from test_eval_script import eval_script
from test_training_losses import one_thread  # noqa: F401 (autouse fixture)

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "assets" / "toy-kontext"
ADAPTER = TOY / "sliders" / "stlora" / "selective_lora.safetensors"
EXAMPLE = json.loads((TOY / "example.json").read_text())

# Loaded by each rank (PYTHONPATH): every pipeline call appends its prompt's sliders to the file of its rank.
COUNTING_HOOK = '''
import json, os
if "RANK" in os.environ:  # torchrun's workers, not the launcher
    from slideredit.pipelines import SliderEditFluxKontextPipeline
    _call = SliderEditFluxKontextPipeline.__call__

    def _counted(self, *args, **kwargs):
        with open(os.path.join(os.environ["CALLS_DIR"], "rank" + os.environ["RANK"]), "a") as file:
            file.write(json.dumps([kwargs.get("subprompts_list"), kwargs.get("slider_alpha_list")]) + "\\n")
        return _call(self, *args, **kwargs)

    SliderEditFluxKontextPipeline.__call__ = _counted
'''


def cell_of(kwargs: dict) -> list:
    """A pipeline call as the hook writes it: the sub-prompts and their alphas."""
    return [kwargs.get("subprompts_list"), kwargs.get("slider_alpha_list")]


@pytest.fixture()
def spy(monkeypatch) -> list[list]:
    """The cells of this process's pipeline calls, in order; the calls run as usual."""
    calls, original = [], SliderEditFluxKontextPipeline.__call__

    def call(self, *args, **kwargs):
        calls.append(json.loads(json.dumps(cell_of(kwargs))))  # tuples become lists, as in the hook's file
        return original(self, *args, **kwargs)
    monkeypatch.setattr(SliderEditFluxKontextPipeline, "__call__", call)
    return calls


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Path:
    """Two cases of the toy example: both sliders (5 cells: each swept alone over -1, 0, 1), then the second
    slider alone (3 cells)."""
    folder = tmp_path_factory.mktemp("cases")
    shutil.copy(TOY / "example.png", folder / "scene.png")
    both = {"image": "scene.png", "prompt": EXAMPLE["prompt"], "subprompts": EXAMPLE["subprompts"],
            "attribute": EXAMPLE["subprompts"]}
    second = {**both, "subprompts": EXAMPLE["subprompts"][1:], "attribute": EXAMPLE["subprompts"][1:]}
    path = folder / "cases.jsonl"
    path.write_text(json.dumps(both) + "\n" + json.dumps(second) + "\n")
    return path


def eval_argv(cases: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(TOY), "--stlora", str(ADAPTER), "--cases", str(cases), "--alphas=-1,0,1", "--steps", "2",
            "--dtype", "float32", "--device", "cpu", "--out", str(out), *extra]


def infer_argv(out: Path) -> list[str]:
    """The toy example's 3 x 3 grid in batches of 2: 5 batches, the last of one cell."""
    return ["--alphas=-1,0,1", "--steps", "2", "--batch-size", "2", "--dtype", "float32", "--device", "cpu",
            "--out", str(out)]


def counting_env(tmp_path: Path) -> dict[str, str]:
    """The environment of torchrun's processes: one thread, and the counting hook writing into tmp_path/calls."""
    hook, calls = tmp_path / "hook", tmp_path / "calls"
    hook.mkdir(exist_ok=True)
    calls.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(COUNTING_HOOK)
    return {**os.environ, "OMP_NUM_THREADS": "1", "CALLS_DIR": str(calls),
            "PYTHONPATH": os.pathsep.join([str(hook), str(REPO)])}  # the repository first, as for the script


def calls_by_rank(tmp_path: Path) -> dict[int, list]:
    return {int(path.name[len("rank"):]): [json.loads(line) for line in path.read_text().splitlines()]
            for path in (tmp_path / "calls").iterdir()}


def torchrun(launch: list[str], script: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launch, str(REPO / script), *argv],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(*runs: subprocess.Popen) -> None:
    """Wait for the launches; past the timeout (a rendezvous nobody joins) stop them all."""
    try:
        for run in runs:
            _, err = run.communicate(timeout=300)
            assert run.returncode == 0, err[-3000:]
    finally:
        for run in runs:
            if run.poll() is None:
                run.terminate()  # torchrun passes it on to its workers (a kill would leave them running)
                run.wait(timeout=60)


def two_processes(tmp_path: Path, script: str, argv: list[str]) -> dict[int, list]:
    """Run `script` under torchrun with 2 processes on this machine; return each rank's pipeline calls."""
    finish(torchrun(["--standalone", "--nproc_per_node", "2"], script, argv, counting_env(tmp_path)))
    return calls_by_rank(tmp_path)


def folder_bytes(folder: Path, replace: tuple[Path, Path] | None = None) -> dict[str, bytes]:
    """Every file under `folder`, hidden ones included; `replace` rewrites one out folder's path into another's
    in the two files that name it (metrics.csv's image column, summary.json's inputs and sweeps)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if replace and path.name in ("metrics.csv", "summary.json"):
            data = data.replace(str(replace[0]).encode(), str(replace[1]).encode())
        files[str(path.relative_to(folder))] = data
    return files


def killed_run(cases: Path, out: Path, monkeypatch, cells: int = 3) -> None:
    """An evaluation into `out` stopped after `cells` cells: the next pipeline call raises, as a kill would
    stop the run there."""
    with monkeypatch.context() as patch:
        stop_pipeline_after(patch, cells)
        with pytest.raises(KeyboardInterrupt):
            eval_script.main(eval_argv(cases, out))


# What a run killed after 3 cells left: the first slider's three cells of case 0 are done.
LEFT_AFTER_3 = [[EXAMPLE["subprompts"], [0.0, -1.0]], [EXAMPLE["subprompts"], [0.0, 1.0]],
                [EXAMPLE["subprompts"][1:], [-1.0]], [EXAMPLE["subprompts"][1:], [0.0]],
                [EXAMPLE["subprompts"][1:], [1.0]]]


def test_two_ranks_write_what_one_process_writes(cases, tmp_path, spy):
    one, two = tmp_path / "one", tmp_path / "two"
    assert eval_script.main(eval_argv(cases, one)) == 0
    assert len(spy) == 8
    calls = two_processes(tmp_path, "eval.py", eval_argv(cases, two))

    assert calls == {0: spy[0::2], 1: spy[1::2]}  # each cell made once, on one rank
    assert folder_bytes(two) == folder_bytes(one, replace=(one, two))  # every file, and only those
    assert (two / "sweeps" / "case000" / "index.html").is_file() and (two / "curves.png").is_file()
    assert not (two / "sweeps" / eval_script.MANIFEST).exists()


def test_a_rerun_after_a_kill_makes_only_the_missing_cells(cases, tmp_path, monkeypatch, spy):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    eval_script.main(eval_argv(cases, whole))
    killed_run(cases, resumed, monkeypatch)
    manifest = json.loads((resumed / "sweeps" / eval_script.MANIFEST).read_text())
    assert sorted(manifest["cells"]) == ["case000/cells/+0.000_+0.000.png", "case000/cells/+1.000_+0.000.png",
                                         "case000/cells/-1.000_+0.000.png"]
    assert not (resumed / "metrics.csv").exists()

    spy.clear()
    eval_script.main(eval_argv(cases, resumed))
    assert spy == LEFT_AFTER_3
    assert folder_bytes(resumed) == folder_bytes(whole, replace=(whole, resumed))
    assert not (resumed / "sweeps" / eval_script.MANIFEST).exists()  # complete: a rerun makes every cell again


def test_a_changed_setting_or_a_lost_cell_is_made_again(cases, tmp_path, monkeypatch, spy):
    out = tmp_path / "out"
    killed_run(cases, out, monkeypatch)
    (out / "sweeps" / "case000" / "cells" / "+1.000_+0.000.png").unlink()  # recorded, but gone
    spy.clear()
    eval_script.main(eval_argv(cases, out))
    assert spy == [[EXAMPLE["subprompts"], [1.0, 0.0]], *LEFT_AFTER_3]

    killed_run(cases, out, monkeypatch)
    spy.clear()
    eval_script.main(eval_argv(cases, out, "--seed", "1"))  # other images: nothing of the killed run is kept
    assert len(spy) == 8


def test_two_ranks_render_one_sweeps_cells_like_one_process(tmp_path, spy):
    one, two = tmp_path / "one", tmp_path / "two"
    infer.main(infer_argv(one))
    assert len(spy) == 5  # batches of 2, 2, 2, 2 and 1 cell
    calls = two_processes(tmp_path, "infer.py", infer_argv(two))

    assert calls == {0: spy[0::2], 1: spy[1::2]}  # each batch rendered once, batched as one process batches
    assert folder_bytes(two) == folder_bytes(one)  # cells, grid, GIF, sweep.json and the explorer page


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_nodes_on_localhost_resume_a_killed_evaluation(cases, tmp_path, monkeypatch):
    """Two torchrun launches of one process each meet at a c10d rendezvous, as two machines would, and
    finish an evaluation a kill stopped after 3 of its 8 cells (5 left: rank 1 idles in the last round)."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    eval_script.main(eval_argv(cases, whole))
    killed_run(cases, resumed, monkeypatch)

    env, endpoint = counting_env(tmp_path), f"127.0.0.1:{free_port()}"
    finish(*[torchrun(["--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node), "--rdzv_backend", "c10d",
                       "--rdzv_endpoint", endpoint, "--rdzv_id", "sharded-eval-test"],
                      "eval.py", eval_argv(cases, resumed), env)
             for node in (0, 1)])
    assert calls_by_rank(tmp_path) == {0: LEFT_AFTER_3[0::2], 1: LEFT_AFTER_3[1::2]}
    assert folder_bytes(resumed) == folder_bytes(whole, replace=(whole, resumed))


def test_what_torchrun_cannot_split_is_refused(cases, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        eval_script.parse_args(["--sweep", str(tmp_path)])
    assert "--sweep only scores, in one process: run it without torchrun" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        infer.parse_args(["--slider-alphas", "1", "0", "--stlora", str(ADAPTER), "--subprompts", *EXAMPLE["subprompts"],
                          "--out", str(tmp_path / "edit.png")])
    assert "one edit runs in one process: run it without torchrun" in capsys.readouterr().err

    # Only rank 0 writes, so only rank 0 checks --out: another machine's rank need not have its folder.
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    monkeypatch.setenv("RANK", "1")
    assert eval_script.parse_args(eval_argv(cases, a_file / "out")).out == a_file / "out"
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit):
        eval_script.parse_args(eval_argv(cases, a_file / "out"))
    assert f"{a_file} is a file, not a folder" in capsys.readouterr().err
