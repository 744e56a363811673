"""slideredit.training.outputs: what --overwrite removes (only what a run wrote) and what makes an
output_dir an earlier run's (only a run's results). Entries of a run are made here by name; train.py's
own run is in test_train_script.py."""
import torch

from slideredit.training.checkpoints import STATE_FILE
from slideredit.training.outputs import clear_output_dir, results

RUN = {  # what a run writes, and what a killed atomic write of it leaves (slideredit.atomic's names)
    "checkpoint-4/": [STATE_FILE, "pytorch_lora_weights.safetensors"],
    ".checkpoint-8.1234abcd.tmp/": ["pytorch_lora_weights.safetensors"],
    ".checkpoint-6.0a1b2c3d.old/": [STATE_FILE],
    "pytorch_lora_weights.safetensors": None,
    ".selective_lora.5e6f7a8b.safetensors.tmp": None,
    "config.yaml": None,
    "train.log": None,
    "validation/step-6.png": None,
    "validation/.step-8.9abcdef0.png.tmp": None,
}
USERS = {  # the user's own entries, named like a run's
    "checkpoint-3": None,  # a file
    "checkpoint-5/": ["notes.txt"],  # a folder without a training state
    ".checkpoint-7.backup/": [STATE_FILE],
    ".config.yaml.bak.tmp": None,
    "notes.txt": None,
    "validation/step-6.best.png": None,
}


def make(out, entries: dict) -> None:
    """Each entry as a file holding its name, or a folder ("name/") of such files."""
    for name, files in entries.items():
        path = out / name
        if files is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(name)
        else:
            path.mkdir(parents=True)
            for file in files:
                if file == STATE_FILE:
                    torch.save({"step": 1}, path / file)
                else:
                    (path / file).write_text(file)


def snapshot(out) -> dict:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_overwrite_removes_only_what_a_run_wrote(tmp_path):
    make(tmp_path, USERS)
    users = snapshot(tmp_path)
    make(tmp_path, RUN)
    removed = clear_output_dir(tmp_path)
    assert sorted(str(p.relative_to(tmp_path)) for p in removed) == sorted(name.rstrip("/") for name in RUN)
    assert snapshot(tmp_path) == users  # every file of the user's, unchanged


def test_the_users_entries_alone_are_not_an_earlier_run(tmp_path):
    make(tmp_path, USERS)
    assert results(tmp_path) == []
    make(tmp_path, RUN)
    assert sorted(str(p.relative_to(tmp_path)) for p in results(tmp_path)) == [
        "checkpoint-4", "pytorch_lora_weights.safetensors", "validation/step-6.png"]
