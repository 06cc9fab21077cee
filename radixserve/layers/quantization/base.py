"""The interface every quantization scheme implements for a linear layer.

A `QuantMethod` creates a layer's parameters (in the shapes and dtypes its checkpoint
format stores), turns them after loading into what its kernels read, and applies the
layer. linear.py owns tensor-parallel sharding: each parameter carries a `ParamLayout`
that says which of its dimensions run over the layer's output and input features, and
how many features one element covers there (8 for int4 values packed in an int32, 128
for a 128x128 block scale), so one loader shards weights, packed weights and scales.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from radixserve.layers.layernorm import RMSNorm


@dataclass(frozen=True)
class ParamLayout:
    """How a parameter's dimensions map onto its layer's features.

    output_dim / input_dim: the dimension that runs over output (input) features, or
    None when the parameter is not split along them. output_pack / input_pack:
    features per element along that dimension; a partial last element (block scales of
    a size that is not a multiple of the block) is allowed only at the tensor's end.
    shard_scalar: the checkpoint holds one value per packed shard (per-tensor scales of
    q, k, v or gate, up), which fills that shard's rows of an [N, 1] parameter.
    reduce_max: the checkpoint holds one value per shard and the layer keeps their
    maximum (static activation scales: all shards read the same input).
    """

    output_dim: int | None = None
    input_dim: int | None = None
    output_pack: int = 1
    input_pack: int = 1
    shard_scalar: bool = False
    reduce_max: bool = False


WEIGHT_LAYOUT = ParamLayout(output_dim=0, input_dim=1)


def packed_extent(features: int, pack: int) -> int:
    """Elements that hold `features` features at `pack` features per element."""
    return math.ceil(features / pack)


def new_param(layer: nn.Module, name: str, data: torch.Tensor, layout: ParamLayout,
              dummy: Callable[[torch.Tensor, torch.Generator], None] | None = None
              ) -> nn.Parameter:
    """Register `data` as parameter `name` of `layer`, with its layout and loader.

    dummy: how `--load-format dummy` fills it (random values that keep activations
    finite); without one, the dummy loader's float default applies.
    """
    param = nn.Parameter(data, requires_grad=False)
    param.shard_layout = layout
    param.weight_loader = layer.weight_loader
    if dummy is not None:
        param.init_dummy = dummy
    layer.register_parameter(name, param)
    return param


def replace_param(layer: nn.Module, name: str, data: torch.Tensor) -> None:
    """Set a parameter to its processed form after loading (no loader needed any more)."""
    if hasattr(layer, name):
        delattr(layer, name)
    layer.register_parameter(name, nn.Parameter(data, requires_grad=False))


class QuantMethod(ABC):
    """One quantization scheme's linear layer: create, load (via layouts), apply."""

    @abstractmethod
    def create_weights(self, layer: nn.Module, input_size: int, output_size: int,
                       params_dtype: torch.dtype, full_input_size: int) -> None:
        """Register the layer's parameters for this rank's [output_size, input_size]
        slice (`full_input_size`: the whole layer's, which row-parallel layers split)."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Turn the loaded parameters into what `apply` reads (repack, requantize)."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None,
              silu_and_mul_input: bool = False, out: torch.Tensor | None = None
              ) -> torch.Tensor:
        """The layer's output for x [..., K] (or [..., 2K] gate/up with
        silu_and_mul_input); written into `out` when given."""

    def apply_normed(self, layer: nn.Module, x: torch.Tensor, residual: torch.Tensor | None,
                     norm: RMSNorm, bias: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(apply(norm(h)), h) for h = x + residual; schemes without a fused kernel
        run the norm first."""
        h, residual = norm.add_norm(x, residual)
        return self.apply(layer, h, bias), residual


def finish_output(result: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """`result`, or `out` holding it when the caller gave a destination."""
    if out is None:
        return result
    out.copy_(result)
    return out


class QuantConfig(ABC):
    """A checkpoint's (or the flag's) quantization: which QuantMethod its linear layers
    take, and which modules it leaves in float."""

    name: str = ""
    # HF module names ("model.layers.0.mlp.gate_proj") or "re:" patterns kept in float.
    ignored: tuple[str, ...] = ()

    @abstractmethod
    def linear_method(self) -> QuantMethod:
        """A fresh method for one linear layer."""

    def is_ignored(self, hf_module: str) -> bool:
        import re

        return any(re.fullmatch(p[3:], hf_module) if p.startswith("re:")
                   else hf_module == p or hf_module.endswith("." + p) for p in self.ignored)
