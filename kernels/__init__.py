"""Fused kernels for SliderEdit: the masked multi-slider LoRA linear (Triton on CUDA, PyTorch elsewhere)."""
from kernels.masked_lora import MAX_STACKED_RANK, masked_lora_linear

__all__ = ["MAX_STACKED_RANK", "masked_lora_linear"]
