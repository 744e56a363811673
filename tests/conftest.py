"""Test-wide setup.

TRITON_INTERPRET must be set before `kernels` is first imported, so the Triton kernels run on the CPU
with NumPy. Tests never touch the network: the hub client is forced offline.

Float comparisons (tests/README.md): exact equality (torch.equal) only where both sides run the same
kernels on the same shapes and strides; otherwise `from tolerances import assert_close_ulps` and
compare within a few ULPs of the output's scale. BLAS routines differ by CPU (Intel vs AMD EPYC) and by
operand layout, so a test that is bit-exact on one machine fails on another.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_kontext_dir(tmp_path_factory):
    """A complete tiny Kontext model folder in the diffusers layout, random weights, built once."""
    from tiny_kontext import build_tiny_kontext_folder

    return build_tiny_kontext_folder(tmp_path_factory.mktemp("tiny_kontext") / "model")


@pytest.fixture()
def umask():
    """Set the process umask for one test (0o022 until the test sets another) and restore it afterwards."""
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)
