"""Test-wide setup.

TRITON_INTERPRET must be set before `kernels` is first imported, so the Triton kernels run on the CPU
with NumPy. Tests never touch the network: the hub client is forced offline.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
