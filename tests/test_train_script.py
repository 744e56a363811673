"""train.py and the training loop end to end on the tiny model folder: outputs, exact kill-and-resume,
checkpoints loading into the pipeline, unreadable and empty data, NaN stops, the encoding cache."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import train as train_script
from slideredit.pipelines import SliderEditFluxKontextPipeline
from slideredit.sliders import GSTLORA, STLORA, adapter_parameters
from slideredit.training import TrainConfig, TrainingDiverged, train
from slideredit.training.checkpoints import checkpoints, load_training_state
from slideredit.training.data import DataError
from slideredit.training.loop import Trainer
from test_training_losses import one_thread  # noqa: F401 (autouse fixture)

EDITS = ["make the hair curly", "add a red hat", "remove the glasses"]
RESOLUTION = 32  # 2 x 2 latent tokens after packing: every path runs, in milliseconds
ADAPTER_FILE = {GSTLORA: "pytorch_lora_weights.safetensors", STLORA: "selective_lora.safetensors"}


@pytest.fixture(scope="session")
def short_model_dir(tiny_kontext_dir, tmp_path_factory):
    """The tiny Kontext folder with 32 T5 tokens instead of 512 (its slideredit.json), for fast steps."""
    root = tmp_path_factory.mktemp("short_model") / "model"
    root.mkdir()
    for entry in tiny_kontext_dir.iterdir():
        (root / entry.name).symlink_to(entry)
    (root / "slideredit.json").write_text(json.dumps({"max_sequence_length": 32}))
    return root


def write_images(folder: Path, count: int, seed: int = 0, size=(48, 40)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        paths.append(folder / f"face_{i}.png")
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(paths[-1])
    return paths


@pytest.fixture()
def faces(tmp_path):
    write_images(tmp_path / "faces", 4)
    return tmp_path / "faces"


def make_config(model: Path, out: Path, images: Path, **changes) -> TrainConfig:
    values = dict(pretrained_model_name_or_path=str(model), images_dataset_path=str(images),
                  training_single_edit_prompts=EDITS, resolution=RESOLUTION, mixed_precision="no", lora_rank=4,
                  learning_rate=1e-3, train_batch_size=2, max_train_steps=4, checkpointing_steps=2,
                  validation_steps=1000, output_dir=str(out), seed=3)
    return TrainConfig(**{**values, **changes})


def adapter_file(folder: Path, method: str) -> dict[str, torch.Tensor]:
    return load_file(folder / ADAPTER_FILE[method])


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ---------------------------------------------------------------------------------------------------

def test_cli_writes_checkpoints_validation_grids_and_the_final_adapter(short_model_dir, faces, tmp_path):
    config_file = tmp_path / "gstlora.yaml"
    config_file.write_text(yaml.safe_dump({  # the release's field names
        "pretrained_model_name_or_path": str(short_model_dir), "images_dataset_path": str(faces),
        "training_single_edit_prompts": EDITS, "max_num_instructions_per_prompt": 2,
        "validation_prompts": ["make the hair curly and add a red hat"], "validation_lora_scales": [-1, 0, 1],
        "lora_rank": 4, "lora_dropout": 0, "learning_rate": "1e-3", "train_batch_size": 2,
        "gradient_accumulation_steps": 1, "max_train_steps": 100, "checkpointing_steps": 2, "validation_steps": 2,
        "guidance_scale": 3.5, "max_grad_norm": 1.0, "seed": 0, "output_dir": str(tmp_path / "out"),
        "resume_from_checkpoint": None}))
    result = train_script.main(["--config", str(config_file), "--max_train_steps", "2", "--resolution", "32",
                                "--mixed_precision", "no", "--validation_num_inference_steps", "2"])
    out = tmp_path / "out"
    assert result.step == 2 and np.isfinite(result.loss)
    assert [step for step, _ in checkpoints(out)] == [2]
    assert sorted(p.name for p in (out / "checkpoint-2").iterdir()) == [ADAPTER_FILE[GSTLORA], "training_state.pt"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    assert_same_tensors(adapter_file(out, GSTLORA), adapter_file(out / "checkpoint-2", GSTLORA))
    grid = Image.open(out / "validation" / "step-2.png")
    assert grid.height == 18 + RESOLUTION  # label strip + one row
    assert yaml.safe_load((out / "config.yaml").read_text())["max_train_steps"] == 2
    assert "step 2: loss" in (out / "train.log").read_text()


@pytest.mark.parametrize("method", [GSTLORA, STLORA])
def test_a_checkpoint_loads_into_the_pipeline_unchanged(short_model_dir, faces, tmp_path, method):
    trainer = Trainer(make_config(short_model_dir, tmp_path / "out", faces, method=method, max_train_steps=2,
                                  validation_prompts=["make the hair curly and add a red hat"], validation_steps=2,
                                  validation_lora_scales=[-1, 0, 0.5, 1], validation_num_inference_steps=2))
    trainer.run()
    assert Image.open(tmp_path / "out" / "validation" / "step-2.png").width > 4 * RESOLUTION
    trained = {name: p.detach() for name, p in adapter_parameters(trainer.model, method).items()}
    assert any(name.endswith("lora_B") and p.abs().max() > 0 for name, p in trained.items())  # it trained

    pipe = SliderEditFluxKontextPipeline.from_pretrained(short_model_dir, torch_dtype=torch.float32)
    getattr(pipe, f"load_{method}")(tmp_path / "out" / "checkpoint-2")
    loaded = adapter_parameters(pipe.transformer, method)
    assert loaded.keys() == trained.keys()
    for name in trained:
        assert torch.equal(loaded[name], trained[name]), name


def test_a_killed_run_resumes_exactly(short_model_dir, faces, tmp_path, monkeypatch):
    """STLoRA with gradient accumulation: a run killed after step 3 (last checkpoint at step 2) and resumed
    with --resume latest ends with the same weights, bit for bit, as a run that was never interrupted."""
    changes = dict(method=STLORA, train_batch_size=1, gradient_accumulation_steps=2)
    train(make_config(short_model_dir, tmp_path / "straight", faces, **changes))

    killed = tmp_path / "killed"
    original = Trainer.train_step

    def dies_after_step_3(self):
        if self.step == 3:
            raise KeyboardInterrupt  # as if the process were killed here
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", dies_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(make_config(short_model_dir, killed, faces, **changes))
    monkeypatch.setattr(Trainer, "train_step", original)
    assert [step for step, _ in checkpoints(killed)] == [2]

    train_script.main(["--config", str(killed / "config.yaml"), "--resume", "latest"])
    assert "resumed from" in (killed / "train.log").read_text()
    assert_same_tensors(adapter_file(killed, STLORA), adapter_file(tmp_path / "straight", STLORA))
    assert_same_tensors(adapter_file(killed / "checkpoint-4", STLORA),
                        adapter_file(tmp_path / "straight" / "checkpoint-4", STLORA))
    state = load_training_state(killed / "checkpoint-4")
    assert state["step"] == 4 and state["samples"] == 8  # 4 steps x global batch 2


def test_resume_needs_the_same_method(short_model_dir, faces, tmp_path):
    train(make_config(short_model_dir, tmp_path / "out", faces, max_train_steps=2))
    with pytest.raises(ValueError, match="method='gstlora'"):
        Trainer(make_config(short_model_dir, tmp_path / "out", faces, method=STLORA, resume_from_checkpoint="latest"))


def test_checkpoints_total_limit_keeps_the_newest(short_model_dir, faces, tmp_path):
    train(make_config(short_model_dir, tmp_path / "out", faces, max_train_steps=3, checkpointing_steps=1,
                      checkpoints_total_limit=2, train_batch_size=1))
    assert [step for step, _ in checkpoints(tmp_path / "out")] == [2, 3]


# ---------------------------------------------------------------------------------------------------
# Data problems
# ---------------------------------------------------------------------------------------------------

def test_unreadable_images_are_skipped_and_counted(short_model_dir, tmp_path):
    folder = tmp_path / "faces"
    good = write_images(folder, 3)
    (folder / "garbage.png").write_bytes(b"this is not an image")
    (folder / "truncated.png").write_bytes(good[0].read_bytes()[:120])
    # 3 steps x 2 samples = 6 > 5 images: the first pass over the data meets every file
    result = train(make_config(short_model_dir, tmp_path / "out", folder, max_train_steps=3, checkpointing_steps=3))
    assert result.step == 3 and result.unreadable_images == 2
    log = (tmp_path / "out" / "train.log").read_text()
    assert "garbage.png" in log and "truncated.png" in log and "2 unreadable image(s) skipped" in log
    assert load_training_state(tmp_path / "out" / "checkpoint-3")["unreadable"].numel() == 2


def test_all_images_unreadable_is_a_clear_error(short_model_dir, tmp_path):
    folder = tmp_path / "faces"
    folder.mkdir()
    for name in ("a.png", "b.jpg"):
        (folder / name).write_bytes(b"junk")
    with pytest.raises(DataError, match="every one of the 2 images of the dataset is unreadable"):
        train(make_config(short_model_dir, tmp_path / "out", folder))


def test_an_empty_dataset_is_a_clear_error(short_model_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="empty"):
        train(make_config(short_model_dir, tmp_path / "out", tmp_path / "empty"))


def test_wandb_is_optional_and_named_when_missing(short_model_dir, faces, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ValueError, match="report_to: wandb needs the wandb package"):
        Trainer(make_config(short_model_dir, tmp_path / "out", faces, report_to="wandb"))


def test_the_cli_reports_bad_config_fields(tmp_path):
    config_file = tmp_path / "bad.yaml"
    config_file.write_text("learning_rat: 1e-4\nimages_dataset_path: x\n")
    with pytest.raises(ValueError, match="did you mean 'learning_rate'"):
        train_script.main(["--config", str(config_file)])


# ---------------------------------------------------------------------------------------------------
# NaN, cache
# ---------------------------------------------------------------------------------------------------

def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(short_model_dir, faces, tmp_path, monkeypatch):
    original = Trainer.micro_loss

    def nan_at_step_3(self, batch):
        loss = original(self, batch)
        return loss * float("nan") if self.step == 2 else loss  # self.step counts completed steps

    monkeypatch.setattr(Trainer, "micro_loss", nan_at_step_3)
    # logging every 100 steps: the NaN of step 3 is found when step 4 would be checkpointed
    with pytest.raises(TrainingDiverged, match=r"at step 3.*last good checkpoint is .*checkpoint-2"):
        train(make_config(short_model_dir, tmp_path / "out", faces, logging_steps=100))
    assert [step for step, _ in checkpoints(tmp_path / "out")] == [2]
    assert not (tmp_path / "out" / ADAPTER_FILE[GSTLORA]).exists()


def test_the_cache_gives_the_same_training_without_running_the_encoders(short_model_dir, tmp_path, monkeypatch):
    """An instruction-editing dataset (imagefolder with metadata.jsonl); the second run reads every latent and
    prompt embedding from the cache and must end with the same weights as the first and as an uncached run."""
    folder = tmp_path / "edits"
    paths = write_images(folder, 3)
    rows = [{"file_name": p.name, "edit": edit} for p, edit in zip(paths, EDITS)]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    changes = dict(images_dataset_path=None, dataset_name=str(folder), training_single_edit_prompts=[],
                   max_train_steps=2, cache_dir=str(tmp_path / "cache"))
    train(make_config(short_model_dir, tmp_path / "first", folder, **changes))
    assert len(list((tmp_path / "cache" / "latents").rglob("*.safetensors"))) == 3
    assert len(list((tmp_path / "cache" / "prompts").rglob("*.safetensors"))) == 4  # 3 edits + the neutral prompt

    def must_not_run(*args, **kwargs):
        raise AssertionError("an encoder ran although its output was cached")

    with monkeypatch.context() as m:
        m.setattr(SliderEditFluxKontextPipeline, "encode_prompt", must_not_run)
        m.setattr("slideredit.autoencoder.AutoEncoder.encode", must_not_run)
        train(make_config(short_model_dir, tmp_path / "second", folder, **changes))
    train(make_config(short_model_dir, tmp_path / "uncached", folder, **{**changes, "cache_dir": None}))
    assert_same_tensors(adapter_file(tmp_path / "second", GSTLORA), adapter_file(tmp_path / "first", GSTLORA))
    # Without the cache the encoders see other batch compositions (all prompts, not only the missing ones):
    # the same math, other float rounding.
    uncached, first = adapter_file(tmp_path / "uncached", GSTLORA), adapter_file(tmp_path / "first", GSTLORA)
    for name in first:
        torch.testing.assert_close(uncached[name], first[name], rtol=1e-5, atol=1e-6)


def test_bf16_model_with_fp32_adapter_and_optimizer(short_model_dir, faces, tmp_path):
    """The GPU configuration, on the CPU: the frozen model in bf16, the adapter, its gradients and AdamW's
    moments in fp32; offloading the encoders changes nothing here but must run."""
    trainer = Trainer(make_config(short_model_dir, tmp_path / "out", faces, method=STLORA, mixed_precision="bf16",
                                  offload=True, max_train_steps=1))
    loss = trainer.train_step()
    assert torch.isfinite(loss) and loss > 0
    assert trainer.model.img_in.weight.dtype == torch.bfloat16
    assert {p.dtype for p in trainer.params} == {torch.float32}
    moments = [s["exp_avg"] for s in trainer.optimizer.state.values()]
    assert len(moments) == len(trainer.params) and {m.dtype for m in moments} == {torch.float32}


# ---------------------------------------------------------------------------------------------------
# An output_dir that holds an earlier run: refused, continued (--resume) or replaced (--overwrite)
# ---------------------------------------------------------------------------------------------------

def old_run(model: Path, out: Path, images: Path) -> None:
    """An earlier run's outputs: checkpoint-4 and -6, validation grids, the final adapter, config and log."""
    train(make_config(model, out, images, max_train_steps=6, checkpointing_steps=2, checkpoints_total_limit=2,
                      train_batch_size=1, validation_prompts=["add a red hat"], validation_steps=6,
                      validation_num_inference_steps=1))
    assert [step for step, _ in checkpoints(out)] == [4, 6]


def cli_args(model: Path, out: Path, images: Path, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--images_dataset_path", str(images),
            "--training_single_edit_prompts", *EDITS, "--resolution", str(RESOLUTION), "--mixed_precision", "no",
            "--lora_rank", "4", "--train_batch_size", "1", "--max_train_steps", "2", "--checkpointing_steps", "1",
            "--checkpoints_total_limit", "2", "--output_dir", str(out), "--seed", "5", *extra]


def test_a_fresh_run_into_an_earlier_runs_folder_is_refused_before_the_model_loads(short_model_dir, faces, tmp_path,
                                                                                      monkeypatch):
    out = tmp_path / "out"
    old_run(short_model_dir, out, faces)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded although the run is refused")

    monkeypatch.setattr(SliderEditFluxKontextPipeline, "from_pretrained", must_not_load)
    with pytest.raises(ValueError) as err:
        train_script.main(cli_args(short_model_dir, out, faces))
    message = str(err.value)
    assert str(out) in message and "--resume latest" in message and "--overwrite" in message
    assert "checkpoint-4" in message and "checkpoint-6" in message and ADAPTER_FILE[GSTLORA] in message
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing touched, the log included

    # the final adapter alone is an earlier run's result too
    only_adapter = tmp_path / "only_adapter"
    only_adapter.mkdir()
    (only_adapter / ADAPTER_FILE[STLORA]).write_bytes((out / ADAPTER_FILE[GSTLORA]).read_bytes())
    with pytest.raises(ValueError, match=f"{only_adapter}.*{ADAPTER_FILE[STLORA]}"):
        train_script.main(cli_args(short_model_dir, only_adapter, faces))


def test_overwrite_removes_only_what_a_run_writes_and_pruning_keeps_the_new_checkpoints(short_model_dir, faces,
                                                                                        tmp_path):
    out = tmp_path / "out"
    old_run(short_model_dir, out, faces)
    (out / "notes.txt").write_text("mine")  # the user's files beside the run's
    (out / "data").mkdir()
    (out / "data" / "checkpoint-1").write_text("a file of mine, not a checkpoint folder")
    (out / "validation" / "picked.png").write_bytes(b"my favourite grid")
    (out / ".checkpoint-8.1234abcd.tmp").mkdir()  # a save that was interrupted

    result = train_script.main(cli_args(short_model_dir, out, faces, "--overwrite"))
    assert result.step == 2
    # limit 2: the new run's checkpoint-1 and -2 are kept (the old -4 and -6 are not "newer" ones)
    assert [step for step, _ in checkpoints(out)] == [1, 2]
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "checkpoint-1", "checkpoint-2", ADAPTER_FILE[GSTLORA], "config.yaml", "train.log", "notes.txt", "data",
        "validation"])
    assert (out / "notes.txt").read_text() == "mine" and (out / "data" / "checkpoint-1").is_file()
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["picked.png"]  # the old step-6.png is gone
    assert yaml.safe_load((out / "config.yaml").read_text())["max_train_steps"] == 2
    log = (out / "train.log").read_text()
    assert "step 6" not in log and "removed the earlier run's" in log  # a new log, which says what was removed
    assert_same_tensors(adapter_file(out, GSTLORA), adapter_file(out / "checkpoint-2", GSTLORA))


def test_overwrite_keeps_the_earlier_run_when_the_new_one_cannot_start(short_model_dir, faces, tmp_path):
    out = tmp_path / "out"
    old_run(short_model_dir, out, faces)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(DataError, match="images_dataset_path not found"):
        train_script.main(cli_args(short_model_dir, out, tmp_path / "no-such-folder", "--overwrite"))
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_resume_continues_an_earlier_run_without_overwrite(short_model_dir, faces, tmp_path):
    out = tmp_path / "out"
    old_run(short_model_dir, out, faces)
    result = train_script.main(["--config", str(out / "config.yaml"), "--resume", "latest", "--max_train_steps", "8"])
    assert result.step == 8 and [step for step, _ in checkpoints(out)] == [6, 8]
    with pytest.raises(ValueError, match="--overwrite would remove the checkpoint that --resume names"):
        train_script.main(["--config", str(out / "config.yaml"), "--resume", str(out / "checkpoint-8"), "--overwrite"])
    assert [step for step, _ in checkpoints(out)] == [6, 8]


def test_ctrl_c_says_where_the_last_checkpoint_is_and_how_to_continue(short_model_dir, faces, tmp_path, monkeypatch,
                                                                       capsys):
    out = tmp_path / "out"
    original = Trainer.train_step

    def ctrl_c_after_step_3(self):
        if self.step == 3:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", ctrl_c_after_step_3)
    args = cli_args(short_model_dir, out, faces, "--max_train_steps", "5", "--checkpointing_steps", "2")
    with pytest.raises(SystemExit) as exit_:
        train_script.main(args)
    assert exit_.value.code == 130  # the shell's code for "ended by Ctrl-C"
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    last = err[-1]
    assert last.startswith("interrupted") and str(out / "checkpoint-2") in last and "--resume latest" in last
    assert f"--config {out / 'config.yaml'}" in last

    monkeypatch.setattr(Trainer, "train_step", original)
    result = train_script.main(["--config", str(out / "config.yaml"), "--resume", "latest"])  # what it says to do
    assert result.step == 5 and "resumed from" in (out / "train.log").read_text()


def test_ctrl_c_before_the_first_checkpoint_says_there_is_nothing_to_resume(short_model_dir, faces, tmp_path,
                                                                            monkeypatch, capsys):
    def ctrl_c(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train_step", ctrl_c)
    with pytest.raises(SystemExit) as exit_:
        train_script.main(cli_args(short_model_dir, tmp_path / "out", faces))
    assert exit_.value.code == 130
    assert "no checkpoint was written yet" in capsys.readouterr().err.strip().splitlines()[-1]



# ---------------------------------------------------------------------------------------------------
# Startup: --help, a mistyped flag and Ctrl-C answer before torch is imported
# ---------------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
RUN_TRAIN_PY = r"""
import json, runpy, sys
ctrl_c_at = sys.argv.pop(1)

class CtrlC:  # raises what Ctrl-C raises, while the module `ctrl_c_at` is being imported
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == ctrl_c_at:
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, CtrlC)
sys.argv[0] = "train.py"
try:
    runpy.run_path("train.py", run_name="__main__")
finally:
    print(json.dumps(sorted(name for name in ("torch", "transformers") if name in sys.modules)))
"""


def run_train_py(*args: str, ctrl_c_at: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUN_TRAIN_PY, ctrl_c_at, *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def test_help_answers_without_importing_torch():
    result = run_train_py("--help")
    assert result.returncode == 0, result.stderr[-2000:]
    help_text, imported = result.stdout.rsplit("\n", 2)[:2]
    assert "--learning_rate" in help_text and "(default: 5e-05)" in help_text
    assert json.loads(imported) == []


@pytest.mark.parametrize("module", ["yaml", "torch", "transformers"])
def test_ctrl_c_during_startup_is_one_line(tmp_path, module):
    """Ctrl-C while the config is read (yaml) or while torch and transformers load: one line, exit 130."""
    result = run_train_py("--images_dataset_path", str(tmp_path), "--training_single_edit_prompts", "add a red hat",
                          "--output_dir", str(tmp_path / "out"), ctrl_c_at=module)
    assert result.returncode == 130, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == ["interrupted before training started: nothing was written"]
    assert not (tmp_path / "out").exists()


def test_a_mistyped_flag_names_the_closest_one(capsys):
    with pytest.raises(SystemExit) as exit_:
        train_script.main(["--learning_rat", "1e-4", "--seeed=3", "--images_dataset_path", "x"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "error: unrecognized arguments: --learning_rat (did you mean '--learning_rate'?) 1e-4 "
        "--seeed=3 (did you mean '--seed'?)")

def test_a_resumed_run_keeps_skipping_the_unreadable_images_it_met_before(short_model_dir, tmp_path, monkeypatch):
    """2 readable + 2 unreadable images, 2 samples a step: the first pass (steps 1-2, before checkpoint-2)
    tries every image, so both unreadable ones are known when the run is killed after step 3. The resumed
    run skips them without trying them again, reports the same count and ends bit-identical."""
    folder = tmp_path / "faces"
    write_images(folder, 2)
    (folder / "garbage.png").write_bytes(b"this is not an image")
    (folder / "empty.png").write_bytes(b"")
    changes = dict(max_train_steps=4, checkpointing_steps=2)
    straight = train(make_config(short_model_dir, tmp_path / "straight", folder, **changes))
    assert straight.unreadable_images == 2

    killed = tmp_path / "killed"
    original = Trainer.train_step

    def dies_after_step_3(self):
        if self.step == 3:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", dies_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(make_config(short_model_dir, killed, folder, **changes))
    monkeypatch.setattr(Trainer, "train_step", original)
    assert load_training_state(killed / "checkpoint-2")["unreadable"].numel() == 2

    resumed = train(make_config(short_model_dir, killed, folder, resume_from_checkpoint="latest", **changes))
    assert resumed.step == 4 and resumed.unreadable_images == 2
    after_resume = (killed / "train.log").read_text().split("resumed from", 1)[1]
    assert "skipping unreadable image" not in after_resume  # known from the checkpoint, not met anew
    assert "2 unreadable image(s) skipped" in after_resume
    assert_same_tensors(adapter_file(killed, GSTLORA), adapter_file(tmp_path / "straight", GSTLORA))
    assert load_training_state(killed / "checkpoint-4")["unreadable"].tolist() == \
        load_training_state(tmp_path / "straight" / "checkpoint-4")["unreadable"].tolist()


def test_a_missing_validation_image_fails_before_the_model_loads(short_model_dir, faces, tmp_path, monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded although the validation image is missing")

    monkeypatch.setattr(SliderEditFluxKontextPipeline, "from_pretrained", must_not_load)
    with pytest.raises(ValueError, match=f"validation_image not found: {tmp_path / 'street.png'}"):
        train(make_config(short_model_dir, tmp_path / "out", faces, validation_prompts=["add a red hat"],
                          validation_image=str(tmp_path / "street.png")))
