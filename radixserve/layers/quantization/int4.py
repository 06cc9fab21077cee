"""Int4 weight-only linear layers: AutoAWQ (GEMM version) and GPTQ checkpoints, with
or without act-order (desc_act, g_idx).

Both load their on-disk tensors as they are (int4_packing.py describes the layouts),
are repacked after loading into one layout, and run through the same kernels: the
Triton dequant-GEMV for single rows and the dequant-GEMM otherwise on CUDA, the torch
reference elsewhere. Activations stay in the serving dtype (W4A16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from radixserve.layers.activation import silu_and_mul
from radixserve.layers.lazy_kernels import triton_kernel
from radixserve.layers.quantization.base import (ParamLayout, QuantConfig, QuantMethod,
                                                 finish_output, new_param, packed_extent,
                                                 replace_param)
from radixserve.layers.quantization.int4_packing import (PACK, awq_to_ours, gptq_to_ours,
                                                         int4_matmul_reference)

# Rows of x up to which the GEMV (no tensor cores) runs instead of the GEMM.
GEMV_MAX_ROWS = 1


def _group_size(cfg: dict[str, Any], method: str) -> int:
    bits = cfg.get("bits", cfg.get("w_bit", 4))
    if bits != 4:
        raise ValueError(f"{method} with {bits} bits is not supported (4 only)")
    return int(cfg.get("group_size", cfg.get("q_group_size", 128)))


@dataclass(frozen=True)
class AwqConfig(QuantConfig):
    name: str = "awq"
    group_size: int = 128
    ignored: tuple[str, ...] = ()

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "AwqConfig":
        version = str(cfg.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"awq version {version!r} is not supported (gemm only)")
        if not cfg.get("zero_point", True):
            raise ValueError("awq without zero_point is not supported")
        return cls(group_size=_group_size(cfg, "awq"),
                   ignored=tuple(cfg.get("modules_to_not_convert") or ()))

    def linear_method(self) -> QuantMethod:
        return Int4LinearMethod(self.group_size, "awq")


@dataclass(frozen=True)
class GptqConfig(QuantConfig):
    name: str = "gptq"
    group_size: int = 128  # -1: one group over the whole input
    desc_act: bool = False
    zeros_minus_one: bool = True  # the original ("gptq", v1) checkpoint format

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "GptqConfig":
        fmt = cfg.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"gptq checkpoint_format {fmt!r} is not supported")
        if cfg.get("dynamic"):
            raise ValueError("gptq with per-module `dynamic` overrides is not supported")
        return cls(group_size=_group_size(cfg, "gptq"), desc_act=bool(cfg.get("desc_act")),
                   zeros_minus_one=fmt == "gptq")

    def linear_method(self) -> QuantMethod:
        return Int4LinearMethod(self.group_size, "gptq", self.desc_act, self.zeros_minus_one)


def _fill_random_words(p: torch.Tensor, gen: torch.Generator) -> None:
    p.copy_(torch.randint(-2 ** 31, 2 ** 31 - 1, p.shape, generator=gen, dtype=torch.int64,
                          device=p.device).to(torch.int32))


def _fill_zero_words(p: torch.Tensor, gen: torch.Generator) -> None:
    p.fill_(0x77777777)  # every zero point 7 (8 in GPTQ's v1): values centred


def _fill_scales(p: torch.Tensor, gen: torch.Generator) -> None:
    p.fill_(0.005)  # (q - z) * s then spans about the float dummy weights' range


class Int4LinearMethod(QuantMethod):
    def __init__(self, group_size: int, fmt: str, desc_act: bool = False,
                 zeros_minus_one: bool = True) -> None:
        self.group_size = group_size
        self.fmt = fmt
        self.desc_act = desc_act
        self.zeros_minus_one = zeros_minus_one

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int,
                       params_dtype: torch.dtype, full_input_size: int) -> None:
        group = full_input_size if self.group_size == -1 else self.group_size
        if output_size % PACK or input_size % PACK or input_size % group and \
                input_size != full_input_size:
            raise ValueError(f"int4 {self.fmt}: a [{output_size}, {input_size}] slice does not "
                             f"split into whole packs of {PACK} and groups of {group}")
        self.group = group
        packed_out = output_size // PACK
        # Act-order splits of the input do not follow groups: each rank keeps them all.
        split_groups = not (self.desc_act and input_size != full_input_size)
        group_rows = packed_extent(input_size if split_groups else full_input_size, group)
        group_layout = ParamLayout(output_dim=1, input_dim=0 if split_groups else None,
                                   input_pack=group)
        zeros_layout = ParamLayout(output_dim=1, input_dim=0 if split_groups else None,
                                   output_pack=PACK, input_pack=group)
        if self.fmt == "awq":
            new_param(layer, "qweight", torch.empty(input_size, packed_out, dtype=torch.int32),
                      ParamLayout(output_dim=1, input_dim=0, output_pack=PACK),
                      dummy=_fill_random_words)
        else:
            new_param(layer, "qweight",
                      torch.empty(input_size // PACK, output_size, dtype=torch.int32),
                      ParamLayout(output_dim=1, input_dim=0, input_pack=PACK),
                      dummy=_fill_random_words)
            new_param(layer, "g_idx", torch.empty(input_size, dtype=torch.int32),
                      ParamLayout(input_dim=0), dummy=self._fill_g_idx)
        new_param(layer, "qzeros", torch.empty(group_rows, packed_out, dtype=torch.int32),
                  zeros_layout, dummy=_fill_zero_words)
        new_param(layer, "scales", torch.empty(group_rows, output_size, dtype=torch.float16),
                  group_layout, dummy=_fill_scales)

    def _fill_g_idx(self, p: torch.Tensor, gen: torch.Generator) -> None:
        p.copy_(torch.arange(p.numel(), device=p.device) // self.group)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if self.fmt == "awq":
            parts = awq_to_ours(layer.qweight.data, layer.qzeros.data, layer.scales.data)
        else:
            parts = gptq_to_ours(layer.qweight.data, layer.qzeros.data, layer.scales.data,
                                 layer.g_idx.data, self.zeros_minus_one)
        qweight, zeros, scales, g_idx = parts
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= scales.shape[0]:
            raise ValueError(f"g_idx names groups outside [0, {scales.shape[0]})")
        delattr(layer, "qzeros")
        replace_param(layer, "qweight", qweight.contiguous())
        replace_param(layer, "zeros", zeros.contiguous())
        replace_param(layer, "scales", scales.contiguous())
        replace_param(layer, "g_idx", g_idx.contiguous())

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None,
              silu_and_mul_input: bool = False, out: torch.Tensor | None = None
              ) -> torch.Tensor:
        if silu_and_mul_input:
            x = silu_and_mul(x)
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        args = (rows, layer.qweight, layer.zeros, layer.scales, layer.g_idx, bias)
        name = "int4_gemv" if rows.shape[0] <= GEMV_MAX_ROWS else "int4_gemm"
        kernel = (triton_kernel("radixserve.layers.triton_kernels.int4_gemm", name)
                  if rows.is_cuda else None)
        result = kernel(*args) if kernel is not None else int4_matmul_reference(*args)
        return finish_output(result.view(*x.shape[:-1], -1), out)
