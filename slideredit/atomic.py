"""Atomic writes: nothing a user owns is left half-written by a crash, a kill, Ctrl-C or a power cut.

A file (or a whole folder) is written under a hidden temporary name beside its destination, flushed to
the disk (fsync) and renamed over it only when complete; the folder holding it is flushed after the
rename. Without the flushes a power cut soon after the rename can leave the new name on the disk with
its data still unwritten: an empty file, or a "complete" checkpoint of empty files.

A written file gets the mode a plain open() would give the destination, whatever mode its writer gave
the temporary file (safetensors' save_file makes 0600 files): 0o666 minus the umask (the kernel applies
it, as it does for open()), or the existing file's mode when one is replaced.
"""
from __future__ import annotations

import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def leftover_pattern(stem: str, suffix: str = "") -> str:
    """A regular expression for the hidden names of this module's temporaries beside a destination whose
    stem and suffix match `stem` and `suffix` (regular expressions too): what a killed write leaves,
    `.name.<8 hex>.tmp`, or `.name.<8 hex>.old` for a folder set aside by atomic_folder."""
    return rf"\.{stem}\.[0-9a-f]{{8}}{suffix}\.(?:tmp|old)"


def _create_beside(path: Path, make) -> Path:
    """Create a fresh hidden sibling of `path` with make(name) (O_EXCL semantics); retry on a name clash."""
    for _ in range(100):
        candidate = path.with_name(f".{path.stem}.{secrets.token_hex(4)}{path.suffix}.tmp")  # leftover_pattern
        try:
            make(candidate)
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot find a free temporary name beside {path}")


def _fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(path: Path) -> None:
    if os.name == "posix":  # Windows cannot open a folder to flush it
        _fsync(path)


def _fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder`, itself included, children before their folder."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            _fsync(Path(root, name))
        _fsync_folder(Path(root))


def _cannot_write(path: Path, err: OSError) -> OSError:
    """err, naming the user's path instead of a temporary file they never asked for."""
    return type(err)(err.errno, f"cannot write {path}: {err.strerror}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; when the block succeeds, rename it over `path`
    (atomic on POSIX and Windows). On failure the temporary file is removed and `path` is untouched."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # 0o666 through os.open: the kernel applies the umask, exactly as for open(path, "w")
        tmp = _create_beside(path, lambda name: os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)))
    except OSError as err:
        raise _cannot_write(path, err) from None
    try:
        mode = stat.S_IMODE((path if path.is_file() else tmp).stat().st_mode)  # open() keeps an existing mode
        yield tmp
        os.chmod(tmp, mode)  # the writer may have replaced the file with its own
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except OSError as err:
        if err.errno is None or err.filename not in (None, str(tmp), tmp):  # not a write error on our file
            raise
        raise _cannot_write(path, err) from err  # or no file at all: disk full
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path` to fill; when the block succeeds, it replaces `path`
    (an existing folder there is removed: the caller decides whether it may be). On failure, Ctrl-C
    included, the temporary folder is removed and `path` is untouched."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _create_beside(path, lambda name: os.mkdir(name, 0o777))  # the umask applies, as for mkdir
    except OSError as err:
        raise _cannot_write(path, err) from None
    try:
        yield tmp
        _fsync_tree(tmp)
        try:
            _swap_in(tmp, path)
        except OSError as err:
            raise _cannot_write(path, err) from err
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _swap_in(new: Path, path: Path) -> None:
    """Rename folder `new` to `path`. A folder already there is renamed aside first and deleted only once
    the new one is in place: a kill between the renames leaves it complete under a hidden `.name.*.old`
    sibling, and a failed rename puts it back."""
    old = None
    if path.is_dir():
        old = new.with_name(new.name[:-len(".tmp")] + ".old")
        os.replace(path, old)
    try:
        os.replace(new, path)
    except OSError:
        if old is not None:
            os.replace(old, path)
        raise
    _fsync_folder(path.parent)
    if old is not None:
        shutil.rmtree(old)
