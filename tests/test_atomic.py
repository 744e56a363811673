"""slideredit.atomic: files and folders appear complete or not at all, with the mode open()/mkdir give."""
import errno
import os
import stat

import pytest

from slideredit.atomic import atomic_folder, atomic_path


@pytest.fixture()
def umask():
    """Set a umask for the test and restore the previous one afterwards."""
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


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
