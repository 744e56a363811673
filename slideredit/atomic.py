"""Atomic writes: nothing a user owns is left half-written by a crash, a kill or Ctrl-C.

A file (or a whole folder) is written under a hidden temporary name beside its destination and renamed
over it only when complete. The temporary file gets the mode a plain open() would give the destination:
0o666 minus the umask (the kernel applies it, as it does for open()), or the existing file's mode when
one is replaced.
"""
from __future__ import annotations

import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _create_beside(path: Path, make) -> Path:
    """Create a fresh hidden sibling of `path` with make(name) (O_EXCL semantics); retry on a name clash."""
    for _ in range(100):
        candidate = path.with_name(f".{path.stem}.{secrets.token_hex(4)}{path.suffix}.tmp")
        try:
            make(candidate)
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot find a free temporary name beside {path}")




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
        raise type(err)(err.errno, f"cannot write {path}: {err.strerror}") from None
    try:
        if path.is_file():  # open() on an existing file keeps its mode
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        if err.errno is None or err.filename not in (None, str(tmp), tmp):  # not a write error on our file
            raise
        # name the user's path, not the temporary file they never asked for (or no file at all: disk full)
        raise type(err)(err.errno, f"cannot write {path}: {err.strerror}") from err
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path` to fill; when the block succeeds, it replaces `path`
    (an existing folder there is removed: the caller decides whether it may be). On failure, Ctrl-C
    included, the temporary folder is removed and `path` is untouched.

    The swap is two renames (old folder aside, new one in), then the old one is deleted: a kill between
    the renames leaves the previous folder complete under a hidden `.name.*.old` sibling."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _create_beside(path, lambda name: os.mkdir(name, 0o777))  # the umask applies, as for mkdir
    except OSError as err:
        raise type(err)(err.errno, f"cannot write {path}: {err.strerror}") from None
    try:
        yield tmp
        old = None
        if path.is_dir():
            old = tmp.with_name(tmp.name[:-len(".tmp")] + ".old")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
