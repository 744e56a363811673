"""slideredit.atomic: files and folders appear complete or not at all, with the mode open()/mkdir give,
flushed to the disk before they appear (the `umask` fixture is in conftest.py)."""
import errno
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from slideredit.atomic import atomic_folder, atomic_path


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077, 0o027])
def test_a_new_file_gets_the_mode_open_would_give(tmp_path, umask, mask):
    umask(mask)
    with open(tmp_path / "plain.txt", "w") as file:  # the reference: what a direct write gives
        file.write("x")
    with atomic_path(tmp_path / "atomic.txt") as tmp, open(tmp, "w") as file:
        file.write("x")
    assert mode(tmp_path / "atomic.txt") == mode(tmp_path / "plain.txt") == 0o666 & ~mask


def test_a_replaced_file_keeps_its_mode_as_with_open(tmp_path, umask):
    umask(0o022)
    for name in ("plain.txt", "atomic.txt"):
        (tmp_path / name).write_text("old")
        os.chmod(tmp_path / name, 0o640)
    (tmp_path / "plain.txt").write_text("new")
    with atomic_path(tmp_path / "atomic.txt") as tmp:
        tmp.write_text("new")
    assert mode(tmp_path / "atomic.txt") == mode(tmp_path / "plain.txt") == 0o640
    assert (tmp_path / "atomic.txt").read_text() == "new"


@pytest.mark.parametrize("existing", [None, 0o640], ids=["new", "replacing-0o640"])
@pytest.mark.parametrize("mask", [0o022, 0o002], ids=oct)
def test_a_file_its_writer_made_private_gets_the_mode_open_would_give(tmp_path, umask, mask, existing):
    """safetensors' save_file creates 0600 files; written atomically they get 0o666 minus the umask (or
    the mode of the file they replace), as every other file does."""
    umask(mask)
    path = tmp_path / "adapter.safetensors"
    if existing is not None:
        path.write_bytes(b"old")
        os.chmod(path, existing)
    with atomic_path(path) as tmp:
        save_file({"x": torch.zeros(1)}, tmp)
    assert mode(path) == (0o666 & ~mask if existing is None else existing)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    (tmp_path / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert (tmp_path / "a.txt").read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]


def test_errors_name_the_users_path_not_the_temporary_file(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError) as info, atomic_path(tmp_path / "file" / "out.png"):
        pass
    assert str(tmp_path / "file" / "out.png") in str(info.value) and ".tmp" not in str(info.value)

    def no_space(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(src), None, str(dst))
    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(OSError) as info, atomic_path(tmp_path / "out.png") as tmp:
        tmp.write_text("x")
    assert str(tmp_path / "out.png") in str(info.value) and ".tmp" not in str(info.value)
    assert info.value.errno == errno.ENOSPC


def test_a_folder_is_swapped_in_whole(tmp_path, umask):
    umask(0o027)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with atomic_folder(tmp_path / "out") as folder:
        (folder / "new.txt").write_text("new")
        assert not (tmp_path / "out" / "new.txt").exists()  # nothing visible until the block ends
    assert os.listdir(tmp_path / "out") == ["new.txt"]
    assert os.listdir(tmp_path) == ["out"]  # no temporary or old folder left beside it
    os.mkdir(tmp_path / "plain")
    assert mode(tmp_path / "out") == mode(tmp_path / "plain") == 0o750


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_folder_leaves_the_previous_one_intact(tmp_path, interruption):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(interruption), atomic_folder(tmp_path / "out") as folder:
        (folder / "new.txt").write_text("new")
        raise interruption()
    assert os.listdir(tmp_path / "out") == ["old.txt"] and os.listdir(tmp_path) == ["out"]


def test_a_new_folder_and_its_parents_are_created(tmp_path):
    with atomic_folder(tmp_path / "a" / "b") as folder:
        (folder / "x").write_text("x")
    assert (tmp_path / "a" / "b" / "x").read_text() == "x"


def test_a_failed_folder_swap_puts_the_previous_folder_back(tmp_path, monkeypatch):
    """The new folder's rename into place fails (after the old one was moved aside): the old one is back,
    whole, under its own name, and the error names the user's folder."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    real_replace = os.replace

    def refuse_the_new_folder(src, dst):
        if str(src).endswith(".tmp"):
            raise OSError(errno.EIO, "Input/output error", str(src))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", refuse_the_new_folder)
    with pytest.raises(OSError, match=f"cannot write {tmp_path / 'out'}: Input/output error"):
        with atomic_folder(tmp_path / "out") as folder:
            (folder / "new.txt").write_text("new")
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == ["old.txt"]
    assert (tmp_path / "out" / "old.txt").read_text() == "old"


def record_flushes_and_renames(monkeypatch) -> list[tuple]:
    """os.fsync and os.replace, recorded in call order: ("fsync", inode flushed), ("replace", new name)."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def inode(path) -> int:
    return os.stat(path).st_ino  # a rename keeps it: the temporary file's is the final file's


def test_a_file_is_flushed_before_its_rename_and_its_folder_after(tmp_path, monkeypatch):
    """Otherwise a power cut soon after the rename can leave an empty file under the final name."""
    events = record_flushes_and_renames(monkeypatch)
    with atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("data")
    assert events == [("fsync", inode(tmp_path / "a.txt")), ("replace", "a.txt"), ("fsync", inode(tmp_path))]


def test_a_folder_is_flushed_whole_before_its_rename_and_its_parent_after(tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    events = record_flushes_and_renames(monkeypatch)
    with atomic_folder(tmp_path / "out") as folder:
        (folder / "a.txt").write_text("a")
        (folder / "sub").mkdir()
        (folder / "sub" / "b.txt").write_text("b")
    out = tmp_path / "out"
    swapped_in = events.index(("replace", "out"))
    flushed_before = {ino for kind, ino in events[:swapped_in] if kind == "fsync"}
    assert {inode(p) for p in (out / "a.txt", out / "sub" / "b.txt", out / "sub", out)} <= flushed_before
    assert ("fsync", inode(tmp_path)) in events[swapped_in:]
