"""EpFusedMoE: one MoE layer's routed experts sharded over the EP group, with token
dispatch and combine by all-to-all.

Each rank holds the experts of its physical slots whole (no slicing of the
intermediate dimension). A forward pass:

1. picks the rows this rank dispatches: all of its tokens under DP-attention; under
   EP inside TP, where every rank holds the same tokens, an even 1/N share of them;
2. maps each (token, k) choice to a physical slot (ExpertLocation) and sorts the pairs
   by the rank owning the slot;
3. all-to-all of the pair counts, then of the hidden rows and their local slot ids
   (all_to_all_single with split sizes; the split sizes cross to the host once);
4. runs its experts on what it received (unweighted), all-to-all back the way the rows
   came, and sums each token's k results with its routing weights in float32, so the
   sum is formed as the single-rank layer forms it;
5. under EP inside TP, all-gathers the shares so every rank holds the whole output
   (this replaces the all-reduce that TP experts end with).

The split sizes force one device-to-host copy per layer, so this path is eager only
(ServerArgs turns CUDA graphs off with it).
"""

from __future__ import annotations

import torch
from torch import nn

from radixserve.layers.linear import check_weight_shape
from radixserve.layers.moe.ep.state import ExpertState, get_expert_state
from radixserve.layers.moe.fused_moe import FusedMoE, fused_experts


def make_fused_moe(num_experts: int, hidden_size: int, intermediate_size: int,
                   layer_id: int) -> nn.Module:
    """The routed experts of layer `layer_id`: EpFusedMoE when this process has an
    expert-parallel state (layers/moe/ep/state.py), else FusedMoE."""
    state = get_expert_state()
    if state is None:
        return FusedMoE(num_experts, hidden_size, intermediate_size)
    return EpFusedMoE(num_experts, hidden_size, intermediate_size, layer_id, state)


class EpFusedMoE(nn.Module):
    checkpoint_names = staticmethod(FusedMoE.checkpoint_names)

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 layer_id: int, state: ExpertState) -> None:
        super().__init__()
        if state.location.num_logical != num_experts:
            raise ValueError(f"layer {layer_id} has {num_experts} experts, the placement "
                             f"{state.location.num_logical}")
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.layer_id = layer_id
        self.state = state
        slots = state.location.slots_per_rank
        self.w13_weight = nn.Parameter(torch.empty(slots, 2 * intermediate_size, hidden_size),
                                       requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(slots, hidden_size, intermediate_size),
                                      requires_grad=False)
        self.w13_weight.weight_loader = self.weight_loader
        self.w2_weight.weight_loader = self.weight_loader

    def local_slots_of(self, expert: int) -> list[int]:
        """This rank's slots (0-based on the rank) that hold logical `expert`."""
        loc = self.state.location
        first = self.state.group.rank * loc.slots_per_rank
        row = loc.physical_to_logical[self.layer_id, first:first + loc.slots_per_rank]
        return torch.nonzero(row == expert).flatten().tolist()

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: tuple[int, int | None]) -> None:
        """Copy one expert's gate (part 0), up (1) or down (None) into each of its
        replicas on this rank (none: another rank holds it)."""
        expert, part = shard_id
        inter = self.intermediate_size
        slots = self.local_slots_of(expert)
        if part is None:
            check_weight_shape(loaded_weight, (self.hidden_size, inter))
        else:
            check_weight_shape(loaded_weight, (inter, self.hidden_size))
        if not slots:
            return  # a lazy slice is then never read
        whole = loaded_weight.narrow(0, 0, loaded_weight.shape[0])  # reads a lazy slice
        for slot in slots:
            target = param.data[slot] if part is None else param.data[slot].narrow(
                0, part * inter, inter)
            target.copy_(whole)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor) -> torch.Tensor:
        """x [T, H]; topk_weights [T, k] float32; topk_ids [T, k] logical -> [T, H]."""
        group = self.state.group
        share = group.size > 1 and not self.state.config.enable_dp_attention
        tokens = x.shape[0]
        if share:
            per_rank = -(-tokens // group.size)
            lo = min(group.rank * per_rank, tokens)
            hi = min(lo + per_rank, tokens)
            x, topk_weights, topk_ids = x[lo:hi], topk_weights[lo:hi], topk_ids[lo:hi]
        self.state.record(self.layer_id, topk_ids)
        out = self._dispatch_combine(x, topk_weights, topk_ids)
        if not share:
            return out
        padded = out.new_zeros(per_rank, out.shape[1])
        padded[:out.shape[0]] = out
        # Rank r's share starts at row r * per_rank, so the first `tokens` rows of the
        # gathered shares are the layer's output in token order.
        return group.all_gather(padded).flatten(0, 1)[:tokens]

    def _dispatch_combine(self, x: torch.Tensor, topk_weights: torch.Tensor,
                          topk_ids: torch.Tensor) -> torch.Tensor:
        loc, group = self.state.location, self.state.group
        top_k = topk_ids.shape[1]
        physical = loc.to_physical(self.layer_id, topk_ids)  # [T * k]
        owner = torch.div(physical, loc.slots_per_rank, rounding_mode="floor")
        order = torch.argsort(owner, stable=True)
        send_counts = torch.bincount(owner, minlength=group.size)
        recv_counts = group.exchange_counts(send_counts)
        send, recv = send_counts.tolist(), recv_counts.tolist()  # the one host sync
        pair_token = torch.div(order, top_k, rounding_mode="floor")
        rows = group.all_to_all(x[pair_token], send, recv)
        slots = group.all_to_all(physical[order].remainder(loc.slots_per_rank), send, recv)
        done = group.all_to_all(self._run_local(rows, slots), recv, send)
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        weights = topk_weights.flatten().float()[order]
        out.index_add_(0, pair_token, done.float() * weights[:, None])
        return out.to(x.dtype)

    def _run_local(self, rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """This rank's experts on the rows sent here, one (token, expert) pair a row."""
        if rows.shape[0] == 0:
            return rows
        ones = torch.ones(rows.shape[0], 1, dtype=torch.float32, device=rows.device)
        return fused_experts(rows, self.w13_weight, self.w2_weight, ones,
                             slots.to(torch.int32)[:, None])
