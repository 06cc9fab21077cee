"""Linear layers laid out for tensor parallelism (Megatron style).

Column-parallel layers split the output dimension across ranks; row-parallel layers
split the input dimension and all-reduce the partial sums. Each parameter carries a
`weight_loader(param, loaded_weight, shard_id)` that takes the full checkpoint tensor
and copies this rank's slice, so checkpoints never need re-sharding offline.
Layers take their rank and size from the process's TP group (distributed/) unless
given; with `tp_size == 1` every slice is the whole tensor. `loaded_weight` may be a
lazy safetensors slice (model_loader/safetensors_loader.py): loaders read its `.shape`
and `narrow` it (or `as_tensor` it when unsplit), so each rank reads only its slice.

A layer's parameters and matmul come from its QuantMethod (layers/quantization/); the
loaders here shard any of them through the `ParamLayout` each parameter carries, so
packed int4 weights and block scales split as the float weight does.
"""

from __future__ import annotations

import torch
from torch import nn

from radixserve.distributed.parallel_state import get_tp_group, resolve_tp
from radixserve.layers.layernorm import RMSNorm
from radixserve.layers.quantization.base import (ParamLayout, QuantMethod, new_param,
                                                 packed_extent)
from radixserve.layers.quantization.scope import linear_method


def check_weight_shape(loaded: torch.Tensor, expected: tuple[int, ...] | torch.Size) -> None:
    """The checkpoint tensor must have its full (unsharded) shape: never load a prefix."""
    if tuple(loaded.shape) != tuple(expected):
        raise ValueError(f"shape {tuple(loaded.shape)} does not match the expected "
                         f"{tuple(expected)}")


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor,
                          shard_id: str | int | None = None) -> None:
    """For parameters that are never split (norm weights)."""
    check_weight_shape(loaded_weight, param.shape)
    param.data.copy_(as_tensor(loaded_weight))


def as_tensor(loaded_weight: torch.Tensor) -> torch.Tensor:
    """The whole tensor, also from a lazy safetensors slice (which then reads it all)."""
    return loaded_weight if isinstance(loaded_weight, torch.Tensor) else loaded_weight.full()


def _divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what}={n} is not divisible by tp_size={d}")
    return n // d


class LinearBase(nn.Module):
    """This rank's [output, input] slice of a linear layer, whose parameters and matmul
    come from its QuantMethod (unquantized outside a quantization scope)."""

    def __init__(self, input_size: int, output_size: int, bias: bool, tp_rank: int,
                 tp_size: int, full_input_size: int | None = None) -> None:
        super().__init__()
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        self.input_size = input_size
        self.output_size = output_size
        self.full_input_size = full_input_size or input_size
        self.set_quant_method(linear_method())
        if bias:
            new_param(self, "bias", torch.empty(output_size), ParamLayout(output_dim=0))
        else:
            self.register_parameter("bias", None)

    def set_quant_method(self, method: QuantMethod) -> None:
        """(Re)create the weights for `method` (the loader keeps ignored modules float)."""
        for name in getattr(self, "_method_params", ()):
            delattr(self, name)
        before = set(self._parameters)
        self.quant_method = method
        method.create_weights(self, self.input_size, self.output_size,
                              torch.get_default_dtype(), self.full_input_size)
        self._method_params = tuple(set(self._parameters) - before)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: str | int | None = None) -> None:
        raise NotImplementedError

    def process_weights_after_loading(self) -> None:
        self.quant_method.process_weights_after_loading(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)


def load_output_shard(param: nn.Parameter, loaded: torch.Tensor, dst_start: int, size: int,
                      src_start: int, src_total: int, dst_total: int) -> None:
    """Copy output features [src_start, src_start + size) of a checkpoint tensor that
    holds `src_total` of them into this rank's features [dst_start, dst_start + size)
    (of `dst_total`), through the parameter's layout (packed values, block scales,
    per-shard scalars)."""
    layout: ParamLayout = param.shard_layout
    if layout.reduce_max:
        param.data.copy_(torch.maximum(param.data, _scalar(loaded).to(param.dtype)))
        return
    if layout.shard_scalar:
        param.data.narrow(0, dst_start, size).fill_(_scalar(loaded).item())
        return
    if layout.output_dim is None:
        check_weight_shape(loaded, param.shape)
        whole = as_tensor(loaded).to(param.device, param.dtype)
        # Shards of a packed layer share such a tensor (act-order g_idx of q, k, v).
        if getattr(param, "loaded_whole", False) and not torch.equal(param.data, whole):
            raise ValueError("the shards of this packed layer disagree on a tensor they "
                             "must share")
        param.data.copy_(whole)
        param.loaded_whole = True
        return
    dim, pack = layout.output_dim, layout.output_pack
    ragged_ok = src_start + size == src_total and dst_start + size == dst_total
    if dst_start % pack or src_start % pack or (size % pack and not ragged_ok):
        raise ValueError(f"a shard of {size} output features at {src_start} does not fall "
                         f"on whole groups of {pack} (this layout cannot be split there)")
    expected = list(param.shape)
    expected[dim] = packed_extent(src_total, pack)
    check_weight_shape(loaded, expected)
    n = packed_extent(size, pack)
    param.data.narrow(dim, dst_start // pack, n).copy_(loaded.narrow(dim, src_start // pack, n))


def _scalar(loaded: torch.Tensor) -> torch.Tensor:
    t = as_tensor(loaded)
    if t.numel() != 1:
        raise ValueError(f"expected one value per shard, got shape {tuple(t.shape)}")
    return t.reshape(())


class ColumnParallelLinear(LinearBase):
    """Output rows split across ranks; each rank keeps its outputs (no gather)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 tp_rank: int | None = None, tp_size: int | None = None) -> None:
        tp_rank, tp_size = resolve_tp(tp_rank, tp_size)
        super().__init__(input_size, _divide(output_size, tp_size, "output_size"), bias,
                         tp_rank, tp_size)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: str | int | None = None) -> None:
        rows = self.output_size
        load_output_shard(param, loaded_weight, 0, rows, self.tp_rank * rows,
                          rows * self.tp_size, rows)

    def forward_normed(self, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(norm(h)), h) for h = x + residual (x without one); at decode sizes the
        add and the norm run inside the GEMV (see `rmsnorm_linear`). The input is
        replicated across ranks, so each rank normalises its own full copy, as the
        separate norm does."""
        return self.quant_method.apply_normed(self, x, residual, norm, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input in one matmul (gate/up).

    shard_id is the index in `output_sizes`; each part is split across ranks on its
    own, so rank r holds [gate_r; up_r] and SiluAndMul still pairs them correctly.
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 tp_rank: int | None = None, tp_size: int | None = None) -> None:
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias, tp_rank, tp_size)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: str | int | None = None) -> None:
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"shard_id must be an index below {len(self.output_sizes)}, "
                             f"got {shard_id!r}")
        total = self.output_sizes[shard_id]
        size = _divide(total, self.tp_size, "output size")
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        load_output_shard(param, loaded_weight, offset, size, self.tp_rank * size, total,
                          self.output_size)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul; shard_id is "q", "k" or "v".

    Query heads are split across ranks. When there are fewer KV heads than ranks,
    each KV head is replicated on tp_size / num_kv_heads consecutive ranks.
    """

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int,
                 total_num_kv_heads: int | None = None, bias: bool = False,
                 tp_rank: int | None = None, tp_size: int | None = None) -> None:
        tp_rank, tp_size = resolve_tp(tp_rank, tp_size)
        total_num_kv_heads = total_num_kv_heads or total_num_heads
        self.head_size = head_size
        self.num_heads = _divide(total_num_heads, tp_size, "num_heads")
        if tp_size >= total_num_kv_heads:
            self.num_kv_heads = 1
            self.kv_rank = tp_rank // _divide(tp_size, total_num_kv_heads, "tp_size / kv_heads")
        else:
            self.num_kv_heads = _divide(total_num_kv_heads, tp_size, "num_kv_heads")
            self.kv_rank = tp_rank
        self.q_size = self.num_heads * head_size
        self.kv_size = self.num_kv_heads * head_size
        # Built per rank; the parent's divide would be wrong when KV heads replicate.
        LinearBase.__init__(self, hidden_size, self.q_size + 2 * self.kv_size, bias, tp_rank,
                            tp_size)
        self.total_sizes = {"q": total_num_heads * head_size, "k": total_num_kv_heads * head_size,
                            "v": total_num_kv_heads * head_size}

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: str | int | None = None) -> None:
        if shard_id not in self.total_sizes:
            raise ValueError(f"shard_id must be 'q', 'k' or 'v', got {shard_id!r}")
        if shard_id == "q":
            offset, size, rank = 0, self.q_size, self.tp_rank
        else:
            offset = self.q_size + (0 if shard_id == "k" else self.kv_size)
            size, rank = self.kv_size, self.kv_rank
        load_output_shard(param, loaded_weight, offset, size, rank * size,
                          self.total_sizes[shard_id], self.output_size)


class RowParallelLinear(LinearBase):
    """Input columns split across ranks; partial products are summed by all-reduce."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 tp_rank: int | None = None, tp_size: int | None = None) -> None:
        tp_rank, tp_size = resolve_tp(tp_rank, tp_size)
        super().__init__(_divide(input_size, tp_size, "input_size"), output_size, bias,
                         tp_rank, tp_size, full_input_size=input_size)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: str | int | None = None) -> None:
        layout: ParamLayout = param.shard_layout
        if layout.input_dim is None:  # the bias, per-output scales: not split
            load_output_shard(param, loaded_weight, 0, self.output_size, 0,
                              self.output_size, self.output_size)
            return
        dim, pack = layout.input_dim, layout.input_pack
        cols = self.input_size
        start = self.tp_rank * cols
        if start % pack or (cols % pack and self.tp_rank != self.tp_size - 1):
            raise ValueError(f"{cols} input features per rank do not fall on whole groups "
                             f"of {pack} (this layout cannot be split there)")
        expected = list(param.shape)
        expected[dim] = packed_extent(self.full_input_size, pack)
        check_weight_shape(loaded_weight, expected)
        param.data.copy_(loaded_weight.narrow(dim, start // pack, param.shape[dim]))

    def forward(self, x: torch.Tensor, silu_and_mul_input: bool = False) -> torch.Tensor:
        """silu_and_mul_input: x is a gated MLP's cat(gate, up); see `linear`."""
        bias = self.bias if self.tp_rank == 0 else None
        if self.tp_size == 1:
            return self.quant_method.apply(self, x, bias, silu_and_mul_input)
        group = get_tp_group()
        # The partial product goes straight where the all-reduce wants it, if it has
        # such a place (the NCCL window): that saves a copy kernel per layer.
        target = group.all_reduce_buffer((*x.shape[:-1], self.output_size), x.dtype)
        return group.all_reduce(self.quant_method.apply(self, x, bias, silu_and_mul_input,
                                                        out=target))
