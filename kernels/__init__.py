"""Fused kernels for SliderEdit: the masked multi-slider LoRA linear and the fp8 linear (Triton on CUDA,
chosen per shape by kernels/dispatch.py; PyTorch elsewhere)."""
from kernels.masked_lora import MAX_STACKED_RANK, fp8_linear, masked_lora_linear

__all__ = ["MAX_STACKED_RANK", "fp8_linear", "masked_lora_linear"]
