"""Reading official checkpoints: safetensors files and shards, hub downloads, streaming into a model.

Every model in the project is built on the meta device (no random init of billions of parameters).
Large models are then *streamed* (`map_stored`, `Piece`, `assign_tensors`; the loop is in
transformer_loading.py): each model tensor is allocated once, on its device and in its final dtype,
and each stored tensor is mapped, copied into its rows and dropped, so the peak is the final model plus
the largest single stored tensor, on the host and on the device. Small models may instead read a whole
state dict (`read_safetensors`) and assign it. Everything that can go
wrong with a user's files is reported as a `CheckpointError` that names the file and the tensor.
"""
from __future__ import annotations

import json
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .hub import looks_like_repo_id  # noqa: F401 (the loaders take the rule from here, with download_from_hub)


class CheckpointError(ValueError):
    """A checkpoint could not be found, read or matched to the model."""


# ---------------------------------------------------------------------------------------------------
# Where the files are
# ---------------------------------------------------------------------------------------------------

def download_from_hub(repo_id: str, allow_patterns: list[str], ignore_patterns: list[str] | None = None) -> Path:
    """Fetch only the files matching `allow_patterns` from a hub repo; return the snapshot folder.

    Hub failures (unknown repo, gated repo without an accepted licence, no network) become one
    readable CheckpointError that says what to do.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    page = f"https://huggingface.co/{repo_id}"
    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
    except GatedRepoError:  # a subclass of RepositoryNotFoundError: test it first
        raise CheckpointError(
            f"{repo_id} is a gated repository: accept its licence at {page} while logged in, then "
            "authenticate here with `hf auth login` or the HF_TOKEN environment variable.") from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{repo_id!r} is neither a local path nor a repository on the Hugging Face hub (a private "
            "repository also needs `hf auth login`). Check the spelling or pass a local folder.") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{repo_id}: the requested revision does not exist ({page}).") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise CheckpointError(
            f"could not download {repo_id} ({type(err).__name__}): the hub is unreachable or offline mode "
            "is on (HF_HUB_OFFLINE=1), and the files are not in the local cache. Connect to the network, "
            "or download the files on another machine and pass the local folder instead.") from None


def sharded_files(folder: Path, stem: str) -> list[Path]:
    """The safetensors files of a diffusers/transformers folder: `{stem}.safetensors`, or the shards
    listed by `{stem}.safetensors.index.json`. Returns [] when neither is there."""
    single = folder / f"{stem}.safetensors"
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from None
        shards = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are not in {folder}: {', '.join(missing)}")
        return shards
    return [single] if single.is_file() else []


# ---------------------------------------------------------------------------------------------------
# Reading tensors
# ---------------------------------------------------------------------------------------------------

def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path}: not a readable safetensors file (truncated download or another format?): {err}") from None


def read_safetensors(files: list[Path], *, dtype: torch.dtype | None = None,
                     device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """Read every tensor of `files` (one checkpoint, possibly sharded), converted one at a time to
    `dtype` (floating tensors only) and `device`, so peak host memory stays near one checkpoint.

    Returns (tensors, origin) where origin maps each tensor name to the file it came from.
    """
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for path in files:
        path = Path(path)
        with _open(path) as f:
            for name in f.keys():
                if name in tensors:
                    raise CheckpointError(f"tensor {name!r} appears in both {origin[name]} and {path}")
                try:
                    t = f.get_tensor(name)
                except (SafetensorError, OSError, ValueError) as err:
                    raise CheckpointError(f"{path}: tensor {name!r} cannot be read (truncated file?): {err}") from None
                convert = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
                tensors[name] = t.to(device=device, dtype=convert)
                origin[name] = path
    return tensors, origin


# ---------------------------------------------------------------------------------------------------
# Streaming: stored tensors mapped one at a time, straight into the model's memory
# ---------------------------------------------------------------------------------------------------
# The safetensors format: an 8-byte little-endian header length N, N bytes of JSON
# {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the data, with
# offsets relative to its start. A stored tensor that needs converting is memory-mapped on its own
# (private, copy-on-write) and the mapping is dropped with the tensor; one that only needs copying is
# read into its rows. A page of a file mapping counts in the process's RSS until that mapping goes, so
# mapping whole files (as safe_open does) would keep every copied-from page resident and double a
# one-file checkpoint.

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
           "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_MAX_HEADER = 100 * 2**20  # the format's own limit


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies in a safetensors file (nothing read yet)."""
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of its first element

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1


def _unreadable(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: not a readable safetensors file (truncated download or another format?): {why}")


def read_header(path: Path) -> dict[str, StoredTensor]:
    """The tensors of one safetensors file, from its header only, checked against the file's size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None
            if length is None or length > min(_MAX_HEADER, size - 8):
                raise _unreadable(path, "the header length does not fit the file")
            header = json.loads(f.read(length))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _unreadable(path, f"the header is not JSON ({err})") from None
    except OSError as err:
        raise _unreadable(path, str(err)) from None
    if not isinstance(header, dict):
        raise _unreadable(path, "the header is not a JSON object")
    start = 8 + length
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise _unreadable(path, f"tensor {name!r} has an unsupported or malformed entry {info!r}") from None
        if end - begin != dtype.itemsize * math.prod(shape) or begin < 0 or start + end > size:
            raise _unreadable(path, f"tensor {name!r} lies outside the file or has the wrong size")
        tensors[name] = StoredTensor(path, dtype, shape, start + begin)
    return tensors


def index_safetensors(files: list[Path]) -> dict[str, StoredTensor]:
    """Every tensor of one (possibly sharded) checkpoint, by name; a name in two files is an error."""
    index: dict[str, StoredTensor] = {}
    for path in files:
        for name, stored in read_header(Path(path)).items():
            if name in index:
                raise CheckpointError(f"tensor {name!r} appears in both {index[name].path} and {path}")
            index[name] = stored
    return index


def map_stored(stored: StoredTensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Rows [start, end) of dim 0 (all when None) of a stored tensor, as a CPU tensor in its stored dtype
    backed by a private mapping of the file: nothing is read until used, and the pages leave this
    process with the tensor. Writing to it never reaches the file (copy-on-write)."""
    first, last = rows or (0, stored.rows)
    shape = (last - first, *stored.shape[1:]) if stored.shape else ()
    row_bytes = stored.dtype.itemsize * math.prod(stored.shape[1:])
    start, nbytes = stored.offset + first * row_bytes, (last - first) * row_bytes
    if nbytes == 0:
        return torch.empty(shape, dtype=stored.dtype)
    aligned = start - start % mmap.ALLOCATIONGRANULARITY
    try:
        with open(stored.path, "rb") as f:
            mapping = mmap.mmap(f.fileno(), start + nbytes - aligned, offset=aligned, access=mmap.ACCESS_COPY)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{stored.path}: cannot map bytes {start}..{start + nbytes} ({err})") from None
    raw = torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes, offset=start - aligned)
    if (start - aligned) % stored.dtype.itemsize:  # misaligned for its dtype (never in files safetensors wrote)
        raw = raw.clone()
    return raw.view(stored.dtype).view(shape)


def read_into(stored: StoredTensor, rows: tuple[int, int] | None, out: torch.Tensor) -> None:
    """Copy stored rows into `out`, a contiguous CPU tensor of the stored dtype and the rows' shape, with
    plain reads: the kernel copies the bytes from the page cache straight into `out` (measured 2-4x
    faster than copying from a mapping into fresh memory: page faults taken in the kernel are cheaper)."""
    first, last = rows or (0, stored.rows)
    row_bytes = stored.dtype.itemsize * math.prod(stored.shape[1:])
    buffer = memoryview(out.detach().reshape(-1).view(torch.uint8).numpy())
    with open(stored.path, "rb", buffering=0) as f:
        f.seek(stored.offset + first * row_bytes)
        done = 0
        while done < len(buffer):  # one read() returns at most ~2 GB on Linux
            count = f.readinto(buffer[done:])
            if not count:
                raise CheckpointError(f"{stored.path}: the file ends inside a tensor (truncated?)")
            done += count


@dataclass(frozen=True)
class Piece:
    """Rows [rows[0], rows[1]) of stored tensor `source` (all its rows when None), written to a model
    tensor from row `at` on. A model tensor is made of one piece or several (fused projections)."""
    source: str
    rows: tuple[int, int] | None = None
    at: int = 0

    def row_range(self, index: dict[str, StoredTensor]) -> tuple[int, int]:
        return self.rows or (0, index[self.source].rows)


Plan = dict[str, list[Piece]]  # model tensor name -> the pieces that fill all of its rows


def identity_plan(names) -> Plan:
    return {name: [Piece(name)] for name in names}


def plan_shapes(plan: Plan, index: dict[str, StoredTensor]) -> dict[str, torch.Size]:
    """The shape each planned model tensor will have: its pieces' rows stacked along dim 0."""
    shapes = {}
    for name, pieces in plan.items():
        first = index[pieces[0].source]
        if not first.shape:
            shapes[name] = torch.Size(())
            continue
        for piece in pieces:
            if index[piece.source].shape[1:] != first.shape[1:]:
                raise CheckpointError(f"{name!r} is made of {pieces[0].source!r} {first.shape} and "
                                      f"{piece.source!r} {index[piece.source].shape}, whose trailing dims differ")
        rows = sum(end - start for start, end in (p.row_range(index) for p in pieces))
        shapes[name] = torch.Size((rows, *first.shape[1:]))
    return shapes


def file_order(plan: Plan, index: dict[str, StoredTensor]) -> list[tuple[str, Piece]]:
    """Every (model tensor, piece) in the order the pieces lie on disk: each shard is read front to back."""
    jobs = [(name, p) for name, pieces in plan.items() for p in pieces]
    return sorted(jobs, key=lambda job: (str(index[job[1].source].path), index[job[1].source].offset,
                                         job[1].row_range(index)[0]))


def assign_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put real tensors in place of a (meta-device) model's parameters and buffers, frozen."""
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for key in list(module._parameters):
            if module._parameters[key] is not None:
                module._parameters[key] = nn.Parameter(tensors[prefix + key], requires_grad=False)
        for key in list(module._buffers):
            if module._buffers[key] is not None:
                module._buffers[key] = tensors[prefix + key]


# ---------------------------------------------------------------------------------------------------
# Assigning tensors to a model built on the meta device
# ---------------------------------------------------------------------------------------------------

def _where(name: str, origin: dict[str, Path]) -> str:
    return f"{name!r} (in {origin[name]})" if name in origin else repr(name)


def _listing(names: list[str], origin: dict[str, Path], limit: int = 8) -> str:
    shown = ", ".join(_where(n, origin) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_state_dict(expected: dict[str, torch.Size], found: dict[str, torch.Size],
                     origin: dict[str, Path], what: str) -> None:
    """Raise a CheckpointError naming every missing, unexpected or mis-shaped tensor (by shapes)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = [f"{_where(k, origin)}: checkpoint {tuple(found[k])}, model expects {tuple(expected[k])}"
                  for k in expected if k in found and found[k] != expected[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {_listing(missing, origin)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {_listing(unexpected, origin)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): " + "; ".join(mismatched[:8]))
    if problems:
        files = sorted({str(p) for p in origin.values()})
        raise CheckpointError(f"{what} checkpoint {', '.join(files)} does not match the model:\n  " + "\n  ".join(problems))


def assign_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], origin: dict[str, Path],
                      what: str) -> nn.Module:
    """Check names and shapes against `model` (usually on the meta device), then assign the tensors."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_state_dict(expected, {k: v.shape for k, v in state_dict.items()}, origin, what)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model
