"""FP8 W8A8 linear layers: e4m3 weights with per-tensor, per-channel or block scales,
activations quantized per token (dynamic), per tensor (static, `input_scale`), or per
token and group of bk columns (block checkpoints).

Read from `quantization_config` `quant_method: fp8` (HF / DeepSeek-V3 / Qwen3-FP8:
`weight_scale_inv` for blocks, else `weight_scale` and, when static, `input_scale`),
from compressed-tensors FP8 schemes (compressed_tensors.py), or asked for with
`--quantization fp8` / `w8a8_fp8` on a float checkpoint, which is then quantized as it
loads, one scale per output channel.

Per-tensor checkpoint scales are kept as one scale per output row ([N, 1]): packed
layers (qkv, gate/up) then keep each shard's own scale, and the matmul is the same
row-wise scaled product as for per-channel checkpoints. Static activation scales of a
packed layer's shards collapse to their maximum (they all scale the same input).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from radixserve.layers.activation import silu_and_mul
from radixserve.layers.lazy_kernels import triton_kernel
from radixserve.layers.quantization import fp8_ops
from radixserve.layers.quantization.base import (WEIGHT_LAYOUT, ParamLayout, QuantConfig,
                                                 QuantMethod, finish_output, new_param,
                                                 packed_extent, replace_param)

ACTIVATION_SCHEMES = ("dynamic", "static")


@dataclass(frozen=True)
class Fp8Config(QuantConfig):
    """serialized: the checkpoint holds FP8 weights (else they are quantized at load).
    weight_strategy: tensor | channel | block. block: (bn, bk) for block scales."""

    name: str = "fp8"
    serialized: bool = True
    weight_strategy: str = "block"
    activation_scheme: str = "dynamic"
    block: tuple[int, int] | None = None
    scale_name: str = "weight_scale"
    ignored: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.activation_scheme not in ACTIVATION_SCHEMES:
            raise ValueError(f"fp8 activation_scheme {self.activation_scheme!r} is not "
                             f"supported (one of {', '.join(ACTIVATION_SCHEMES)})")
        if (self.weight_strategy == "block") != (self.block is not None):
            raise ValueError("fp8 block scales need weight_block_size [bn, bk]")
        if self.block is not None and self.activation_scheme == "static":
            raise ValueError("fp8 with block weight scales and static activation scales "
                             "is not supported")

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "Fp8Config":
        """From a `quant_method: fp8` quantization_config (HF / DeepSeek-V3 format)."""
        fmt = cfg.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise ValueError(f"fp8 checkpoints in format {fmt!r} are not supported (e4m3 only)")
        block = cfg.get("weight_block_size")
        if block is not None:
            if len(block) != 2:
                raise ValueError(f"fp8 weight_block_size must be [bn, bk], got {block}")
            block = (int(block[0]), int(block[1]))
        return cls(serialized=True, weight_strategy="block" if block else "tensor",
                   activation_scheme=cfg.get("activation_scheme", "dynamic"), block=block,
                   scale_name="weight_scale_inv" if block else "weight_scale",
                   ignored=tuple(cfg.get("modules_to_not_convert") or ()))

    @classmethod
    def online(cls, name: str) -> "Fp8Config":
        """`--quantization fp8|w8a8_fp8` on a float checkpoint."""
        return cls(name=name, serialized=False, weight_strategy="channel")

    def linear_method(self) -> QuantMethod:
        if self.block is not None:
            return Fp8BlockLinearMethod(self)
        return Fp8LinearMethod(self)


def _fill_fp8(p: torch.Tensor, gen: torch.Generator) -> None:
    p.copy_(torch.randn(p.shape, generator=gen, device=p.device).mul_(0.02).to(p.dtype))


def _fill_one(p: torch.Tensor, gen: torch.Generator) -> None:
    p.fill_(1.0)


def _fill_input_scale(p: torch.Tensor, gen: torch.Generator) -> None:
    p.fill_(0.02)


def _quantize_activation(x: torch.Tensor, group: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic scales per row and `group` columns: the Triton kernel on CUDA."""
    kernel = (triton_kernel("radixserve.layers.triton_kernels.fp8_block_gemm",
                            "per_token_group_quant_fp8") if x.is_cuda else None)
    if kernel is not None:
        return kernel(x, group)
    if group >= x.shape[1]:
        return fp8_ops.quantize_per_token(x)
    return fp8_ops.quantize_per_token_group(x, group)


def _rows(x: torch.Tensor, silu_and_mul_input: bool) -> torch.Tensor:
    if silu_and_mul_input:
        x = silu_and_mul(x)
    return x.reshape(-1, x.shape[-1]).contiguous()


class Fp8LinearMethod(QuantMethod):
    """Per-tensor or per-channel weight scales; per-token or static activations."""

    def __init__(self, config: Fp8Config) -> None:
        self.config = config

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int,
                       params_dtype: torch.dtype, full_input_size: int) -> None:
        cfg = self.config
        if not cfg.serialized:
            new_param(layer, "weight", torch.empty(output_size, input_size, dtype=params_dtype),
                      WEIGHT_LAYOUT)
            return
        new_param(layer, "weight",
                  torch.empty(output_size, input_size, dtype=fp8_ops.FP8_DTYPE),
                  WEIGHT_LAYOUT, dummy=_fill_fp8)
        scale_layout = ParamLayout(output_dim=0, shard_scalar=cfg.weight_strategy == "tensor")
        new_param(layer, cfg.scale_name, torch.empty(output_size, 1, dtype=torch.float32),
                  scale_layout, dummy=_fill_one)
        if cfg.activation_scheme == "static":
            new_param(layer, "input_scale", torch.zeros((), dtype=torch.float32),
                      ParamLayout(reduce_max=True), dummy=_fill_input_scale)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if not self.config.serialized:
            w_q, scale = fp8_ops.quantize_weight_per_channel(layer.weight.data)
            replace_param(layer, "weight", w_q)
            replace_param(layer, "weight_scale", scale)
        else:
            _rename_scale(layer, self.config.scale_name)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None,
              silu_and_mul_input: bool = False, out: torch.Tensor | None = None
              ) -> torch.Tensor:
        rows = _rows(x, silu_and_mul_input)
        if self.config.activation_scheme == "static":
            x_scale = layer.input_scale
            x_q = fp8_ops.quantize_with_scale(rows, x_scale)
        else:
            x_q, x_scale = _quantize_activation(rows, rows.shape[1])
        result = fp8_ops.scaled_mm(x_q, x_scale, layer.weight, layer.weight_scale, bias,
                                   x.dtype)
        return finish_output(result.view(*x.shape[:-1], -1), out)


def _rename_scale(layer: nn.Module, scale_name: str) -> None:
    """The checkpoint's weight-scale name (weight_scale_inv, ...) -> weight_scale."""
    if scale_name != "weight_scale":
        replace_param(layer, "weight_scale", getattr(layer, scale_name).data)
        delattr(layer, scale_name)


class Fp8BlockLinearMethod(QuantMethod):
    """[bn, bk] block weight scales; activations per token and group of bk columns."""

    def __init__(self, config: Fp8Config) -> None:
        assert config.block is not None
        self.config = config
        self.block = config.block

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int,
                       params_dtype: torch.dtype, full_input_size: int) -> None:
        bn, bk = self.block
        new_param(layer, "weight",
                  torch.empty(output_size, input_size, dtype=fp8_ops.FP8_DTYPE),
                  WEIGHT_LAYOUT, dummy=_fill_fp8)
        scales = torch.empty(packed_extent(output_size, bn), packed_extent(input_size, bk),
                             dtype=torch.float32)
        new_param(layer, self.config.scale_name, scales,
                  ParamLayout(output_dim=0, input_dim=1, output_pack=bn, input_pack=bk),
                  dummy=_fill_one)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        _rename_scale(layer, self.config.scale_name)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None,
              silu_and_mul_input: bool = False, out: torch.Tensor | None = None
              ) -> torch.Tensor:
        rows = _rows(x, silu_and_mul_input)
        x_q, x_scale = _quantize_activation(rows, self.block[1])
        result = fp8_ops.block_scaled_mm(x_q, x_scale, layer.weight, layer.weight_scale,
                                         self.block, bias, x.dtype)
        return finish_output(result.view(*x.shape[:-1], -1), out)
