"""Fused kernels for SliderEdit: the masked multi-slider LoRA linear (Triton on CUDA, PyTorch elsewhere)."""
from kernels.masked_lora import masked_lora_linear

__all__ = ["masked_lora_linear"]
