"""Linear layers laid out for tensor parallelism (Megatron style).

Column-parallel layers split the output dimension across ranks; row-parallel layers
split the input dimension and all-reduce the partial sums. Each parameter carries a
`weight_loader(param, loaded_weight, shard_id)` that takes the full checkpoint tensor
and copies this rank's slice, so checkpoints never need re-sharding offline.
Layers take their rank and size from the process's TP group (distributed/) unless
given; with `tp_size == 1` every slice is the whole tensor. `loaded_weight` may be a
lazy safetensors slice (model_loader/safetensors_loader.py): loaders read its `.shape`
and `narrow` it (or `as_tensor` it when unsplit), so each rank reads only its slice.
"""

from __future__ import annotations

import torch
from torch import nn

from radixserve.distributed.parallel_state import get_tp_group, resolve_tp
from radixserve.layers.layernorm import RMSNorm
from radixserve.layers.linear_dispatch import linear, rmsnorm_linear


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
    """A [output, input] weight (and optional bias) of this rank's shape."""

    def __init__(self, input_size: int, output_size: int, bias: bool, tp_rank: int,
                 tp_size: int) -> None:
        super().__init__()
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: str | int | None = None) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class ColumnParallelLinear(LinearBase):
    """Output rows split across ranks; each rank keeps its outputs (no gather)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 tp_rank: int | None = None, tp_size: int | None = None) -> None:
        tp_rank, tp_size = resolve_tp(tp_rank, tp_size)
        super().__init__(input_size, _divide(output_size, tp_size, "output_size"), bias,
                         tp_rank, tp_size)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: str | int | None = None) -> None:
        rows = param.shape[0]
        check_weight_shape(loaded_weight, (rows * self.tp_size, *param.shape[1:]))
        param.data.copy_(loaded_weight.narrow(0, self.tp_rank * rows, rows))

    def forward_normed(self, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(norm(h)), h) for h = x + residual (x without one); at decode sizes the
        add and the norm run inside the GEMV (see `rmsnorm_linear`). The input is
        replicated across ranks, so each rank normalises its own full copy, as the
        separate norm does."""
        return rmsnorm_linear(x, residual, norm, self.weight, self.bias)


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
        check_weight_shape(loaded_weight, (total, *param.shape[1:]))
        param.data.narrow(0, offset, size).copy_(
            loaded_weight.narrow(0, self.tp_rank * size, size))


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
        check_weight_shape(loaded_weight, (self.total_sizes[shard_id], *param.shape[1:]))
        if shard_id == "q":
            offset, size, rank = 0, self.q_size, self.tp_rank
        else:
            offset = self.q_size + (0 if shard_id == "k" else self.kv_size)
            size, rank = self.kv_size, self.kv_rank
        param.data.narrow(0, offset, size).copy_(loaded_weight.narrow(0, rank * size, size))


class RowParallelLinear(LinearBase):
    """Input columns split across ranks; partial products are summed by all-reduce."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 tp_rank: int | None = None, tp_size: int | None = None) -> None:
        tp_rank, tp_size = resolve_tp(tp_rank, tp_size)
        super().__init__(_divide(input_size, tp_size, "input_size"), output_size, bias,
                         tp_rank, tp_size)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: str | int | None = None) -> None:
        if param.dim() == 1:  # the bias is not split: rank 0 alone adds it
            check_weight_shape(loaded_weight, param.shape)
            param.data.copy_(as_tensor(loaded_weight))
            return
        cols = param.shape[1]
        check_weight_shape(loaded_weight, (param.shape[0], cols * self.tp_size))
        param.data.copy_(loaded_weight.narrow(1, self.tp_rank * cols, cols))

    def forward(self, x: torch.Tensor, silu_and_mul_input: bool = False) -> torch.Tensor:
        """silu_and_mul_input: x is a gated MLP's cat(gate, up); see `linear`."""
        bias = self.bias if self.tp_rank == 0 else None
        if self.tp_size == 1:
            return linear(x, self.weight, bias, silu_and_mul_input)
        group = get_tp_group()
        # The partial product goes straight where the all-reduce wants it, if it has
        # such a place (the NCCL window): that saves a copy kernel per layer.
        target = group.all_reduce_buffer((*x.shape[:-1], self.weight.shape[0]), x.dtype)
        return group.all_reduce(linear(x, self.weight, bias, silu_and_mul_input, out=target))
