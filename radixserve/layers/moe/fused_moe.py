"""FusedMoE: the routed experts of one layer as two stacked weights.

`w13_weight` [E, 2 * I_rank, H] holds each expert's gate rows then up rows;
`w2_weight` [E, H, I_rank] its down projection. Under tensor parallelism every rank
keeps all experts and a slice of their intermediate dimension (the gate and up parts
are split on their own, as in MergedColumnParallelLinear, and down by columns as in
RowParallelLinear); partial outputs are summed by one all-reduce.

`fused_experts` picks the path: on CUDA a few tokens run as the small-batch GEMV kernels
(small_batch_moe.py), more as the Triton grouped GEMM (fused_moe_triton.py); elsewhere
the PyTorch reference runs, one matmul pair per expert that received tokens. Loaders
only `narrow` the checkpoint tensor, so a lazy safetensors slice reads just this
rank's part.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from radixserve.distributed.parallel_state import get_tp_group, resolve_tp
from radixserve.layers.lazy_kernels import triton_kernel
from radixserve.layers.linear import check_weight_shape


class FusedMoE(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 tp_rank: int | None = None, tp_size: int | None = None) -> None:
        super().__init__()
        tp_rank, tp_size = resolve_tp(tp_rank, tp_size)
        if intermediate_size % tp_size:
            raise ValueError(f"moe intermediate_size={intermediate_size} is not divisible by "
                             f"tp_size={tp_size}")
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        inter = intermediate_size // tp_size
        self.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden_size),
                                       requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, inter),
                                      requires_grad=False)
        self.w13_weight.weight_loader = self.weight_loader
        self.w2_weight.weight_loader = self.weight_loader

    @staticmethod
    def checkpoint_names(param_name: str, num_experts: int
                         ) -> list[tuple[str, tuple[int, int | None]]] | None:
        """HF per-expert tensor names (with (expert, part) shard ids) for one of our
        stacked parameters, or None when `param_name` is not one."""
        prefix, _, leaf = param_name.rpartition(".")
        parts = {"w13_weight": (("gate_proj", 0), ("up_proj", 1)),
                 "w2_weight": (("down_proj", None),)}.get(leaf)
        if parts is None:
            return None
        return [(f"{prefix}.{e}.{proj}.weight", (e, part))
                for e in range(num_experts) for proj, part in parts]

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: tuple[int, int | None]) -> None:
        """Copy this rank's slice of one expert's gate (part 0), up (1) or down (None)."""
        expert, part = shard_id
        inter = self.intermediate_size // self.tp_size
        start = self.tp_rank * inter
        if part is None:
            check_weight_shape(loaded_weight, (self.hidden_size, self.intermediate_size))
            param.data[expert].copy_(loaded_weight.narrow(1, start, inter))
            return
        check_weight_shape(loaded_weight, (self.intermediate_size, self.hidden_size))
        param.data[expert].narrow(0, part * inter, inter).copy_(
            loaded_weight.narrow(0, start, inter))

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor) -> torch.Tensor:
        """x [T, H]; topk_weights [T, k] float32; topk_ids [T, k] -> [T, H]."""
        out = fused_experts(x, self.w13_weight, self.w2_weight, topk_weights, topk_ids)
        if self.tp_size > 1:
            out = get_tp_group().all_reduce(out)
        return out


# The small-batch path up to this many tokens, and only while the T*k pairs number at
# most the experts. It reads an expert's weights once per pair routed to it (less what
# L2 catches), the grouped GEMM once per distinct expert; T*k random pairs over E
# experts reach about E * (1 - exp(-T*k/E)) distinct ones, so up to T*k = E re-reads
# stay under 1/e of the bytes read, while the grouped path pays its sort-and-pad
# launches, M tiles mostly of padding and a combine at every T.
SMALL_BATCH_MAX_TOKENS = 16


def use_small_batch(tokens: int, top_k: int, num_experts: int) -> bool:
    """Whether `fused_experts` takes the small-batch kernels for this batch on CUDA."""
    return 0 < tokens <= SMALL_BATCH_MAX_TOKENS and tokens * top_k <= max(num_experts, top_k)


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """The experts' weighted sum, by the fastest path for x's device and T (arguments
    as `fused_experts_reference`). The choice depends on shapes only, so a CUDA graph
    captured at one T always replays the same kernels."""
    kernel = None
    if x.is_cuda:
        kernel = (triton_kernel("radixserve.layers.moe.small_batch_moe", "small_batch_experts")
                  if use_small_batch(x.shape[0], topk_ids.shape[1], w13.shape[0]) else
                  triton_kernel("radixserve.layers.moe.fused_moe_triton",
                                "fused_experts_triton"))
    fn = kernel if kernel is not None else fused_experts_reference
    return fn(x, w13, w2, topk_weights, topk_ids)


def fused_experts_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                            topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """The per-expert loop every kernel is checked against (same arguments as
    `fused_experts_triton`). It syncs with the host, so it is not graph-capturable."""
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    flat_ids = topk_ids.flatten().long()
    flat_w = topk_weights.flatten().float()
    top_k = topk_ids.shape[1]
    inter = w13.shape[1] // 2
    for expert in torch.unique(flat_ids).tolist():
        pairs = torch.nonzero(flat_ids == expert).squeeze(1)
        tokens = pairs // top_k
        gate_up = F.linear(x[tokens], w13[expert])
        act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        y = F.linear(act, w2[expert]).float() * flat_w[pairs, None]
        out.index_add_(0, tokens, y)
    return out.to(x.dtype)

