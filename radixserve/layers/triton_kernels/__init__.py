"""Fused elementwise Triton kernels for the model layers, each beside a PyTorch reference."""

from radixserve.layers.triton_kernels.activation import silu_and_mul
from radixserve.layers.triton_kernels.rmsnorm import fused_add_rmsnorm, rmsnorm
from radixserve.layers.triton_kernels.rotary import apply_rotary_

__all__ = ["apply_rotary_", "fused_add_rmsnorm", "rmsnorm", "silu_and_mul"]
