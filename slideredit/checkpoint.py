"""Reading official checkpoints: safetensors files and shards, hub downloads, meta-device assignment.

Every model in the project is built on the meta device (no random init of billions of parameters) and
then receives the tensors read here with `load_state_dict(assign=True)`, so loading never holds a
second copy of the weights. Everything that can go wrong with a user's files is reported as a
`CheckpointError` that names the file and the tensor.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint could not be found, read or matched to the model."""


# ---------------------------------------------------------------------------------------------------
# Where the files are
# ---------------------------------------------------------------------------------------------------

def looks_like_repo_id(source: str | os.PathLike) -> bool:
    """`owner/name` that is not an existing path: a Hugging Face hub repository id."""
    text = str(source)
    return not Path(text).exists() and text.count("/") == 1 and not text.startswith((".", "/", "~"))


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
# Assigning tensors to a model built on the meta device
# ---------------------------------------------------------------------------------------------------

def _where(name: str, origin: dict[str, Path]) -> str:
    return f"{name!r} (in {origin[name]})" if name in origin else repr(name)


def _listing(names: list[str], origin: dict[str, Path], limit: int = 8) -> str:
    shown = ", ".join(_where(n, origin) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_state_dict(expected: dict[str, torch.Size], state_dict: dict[str, torch.Tensor],
                     origin: dict[str, Path], what: str) -> None:
    """Raise a CheckpointError naming every missing, unexpected or mis-shaped tensor."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{_where(k, origin)}: checkpoint {tuple(state_dict[k].shape)}, model expects {tuple(expected[k])}"
                  for k in expected if k in state_dict and state_dict[k].shape != expected[k]]
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
    check_state_dict(expected, state_dict, origin, what)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model
