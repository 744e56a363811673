"""Training checkpoints: atomic folders, `latest`, pruning, and states that load with weights_only=True."""
import os
import random
import stat

import numpy as np
import pytest
import torch

from flux_sizes import TINY_FLUX
from slideredit import CheckpointError, Flux
from slideredit.slider_checkpoints import save_adapter
from slideredit.sliders import GSTLORA, STLORA, adapter_parameters, init_adapter
from slideredit.training import checkpoints as ckpt
from slideredit.training.checkpoints import (checkpoints, global_rng_state, load_training_state, prune_checkpoints,
                                             resolve_resume, save_checkpoint, set_global_rng_state)


@pytest.fixture(scope="module")
def model():
    model = Flux(TINY_FLUX).requires_grad_(False)
    init_adapter(model, GSTLORA, rank=2, generator=torch.Generator().manual_seed(0))
    return model


def optimizer_state(model) -> dict:
    params = list(adapter_parameters(model, GSTLORA).values())
    optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    for p in params:
        p.grad = None
    return optimizer.state_dict()


def state(model, step: int) -> dict:
    return {"step": step, "samples": 2 * step, "optimizer": optimizer_state(model), "rng": global_rng_state(),
            "unreadable": torch.tensor([3, 5])}


def test_state_round_trips_with_weights_only(model, tmp_path):
    folder = save_checkpoint(tmp_path, 7, model, GSTLORA, state(model, 7))
    assert folder == tmp_path / "checkpoint-7"
    loaded = load_training_state(folder)  # torch.load(weights_only=True) inside
    assert loaded["step"] == 7 and loaded["samples"] == 14 and loaded["unreadable"].tolist() == [3, 5]
    params = list(adapter_parameters(model, GSTLORA).values())
    optimizer = torch.optim.AdamW(params, lr=1.0)
    optimizer.load_state_dict(loaded["optimizer"])
    assert optimizer.param_groups[0]["lr"] == 1e-3 and len(optimizer.state) == len(params)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_checkpoints_and_final_adapters_get_the_mode_open_would_give(model, tmp_path, umask):
    """Under umask 022 every file is 0644 and the folder 0755 (what open() and mkdir give), the adapters
    included, although safetensors' save_file creates 0600 files."""
    umask(0o022)
    folder = save_checkpoint(tmp_path, 3, model, GSTLORA, state(model, 3))
    assert {p.name: mode(p) for p in folder.iterdir()} == {"pytorch_lora_weights.safetensors": 0o644,
                                                            "training_state.pt": 0o644}
    assert mode(folder) == 0o755
    stlora = Flux(TINY_FLUX).requires_grad_(False)
    init_adapter(stlora, STLORA, rank=2, generator=torch.Generator().manual_seed(0))
    final = [save_adapter(model, GSTLORA, tmp_path), save_adapter(stlora, STLORA, tmp_path)]  # as train.py does
    assert [(p.name, mode(p)) for p in final] == [("pytorch_lora_weights.safetensors", 0o644),
                                                  ("selective_lora.safetensors", 0o644)]


def test_global_rng_states_restore_exactly(tmp_path):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    random.gauss(0, 1)  # leaves a cached second Gaussian in Python's state
    torch.save(global_rng_state(), tmp_path / "rng.pt")
    first = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), torch.rand(3))
    set_global_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), torch.rand(3))
    assert first[:3] == again[:3] and torch.equal(first[3], again[3])


def test_a_failed_save_leaves_no_checkpoint_and_no_temporary_folder(model, tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 2, model, GSTLORA, state(model, 2))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path, 4, model, GSTLORA, state(model, 4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]
    assert resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-2"


def test_saving_a_step_again_replaces_it(model, tmp_path):
    save_checkpoint(tmp_path, 2, model, GSTLORA, state(model, 2))
    save_checkpoint(tmp_path, 2, model, GSTLORA, {**state(model, 2), "samples": 99})
    assert load_training_state(tmp_path / "checkpoint-2")["samples"] == 99
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]


def test_latest_skips_incomplete_folders_and_pruning_keeps_the_newest(model, tmp_path):
    assert resolve_resume(tmp_path, "latest") is None  # nothing yet: a fresh start
    assert resolve_resume(tmp_path, None) is None
    for step in (5, 10, 20):
        save_checkpoint(tmp_path, step, model, GSTLORA, state(model, step))
    (tmp_path / "checkpoint-30").mkdir()  # not a complete checkpoint (no training_state.pt)
    assert resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-20"  # numeric order, not text order
    assert prune_checkpoints(tmp_path, 2, newest=20) == [tmp_path / "checkpoint-5"]
    assert [s for s, _ in checkpoints(tmp_path)] == [10, 20]


def test_pruning_never_removes_the_checkpoint_just_written_for_later_ones(model, tmp_path):
    """Checkpoints of later steps (4, 6: a run resumed from an earlier point passes them again) are not
    counted: limit 2 at step 2 keeps 1 and 2, and at step 4 the replaced checkpoint-4 and its predecessor."""
    for step in (4, 6, 1, 2):
        save_checkpoint(tmp_path, step, model, GSTLORA, state(model, step))
    assert prune_checkpoints(tmp_path, 2, newest=2) == []
    assert [s for s, _ in checkpoints(tmp_path)] == [1, 2, 4, 6]
    assert prune_checkpoints(tmp_path, 1, newest=2) == [tmp_path / "checkpoint-1"]
    save_checkpoint(tmp_path, 4, model, GSTLORA, state(model, 4))
    assert prune_checkpoints(tmp_path, 2, newest=4) == []
    assert prune_checkpoints(tmp_path, 1, newest=4) == [tmp_path / "checkpoint-2"]
    assert [s for s, _ in checkpoints(tmp_path)] == [4, 6]


def test_bad_resume_paths_and_states_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not a training checkpoint folder"):
        resolve_resume(tmp_path, str(tmp_path / "checkpoint-9"))
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    torch.save({"step": 1}, folder / "training_state.pt")
    with pytest.raises(CheckpointError, match="not a slideredit training state"):
        load_training_state(folder)
    torch.save({"step": 1, "payload": random.Random(0)}, folder / "training_state.pt")  # an arbitrary object
    with pytest.raises(CheckpointError, match="cannot read this training state"):
        load_training_state(folder)
