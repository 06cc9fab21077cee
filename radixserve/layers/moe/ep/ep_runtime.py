"""The per-model side of expert parallelism that runs between forward passes: EPLB's
rebalancing (--enable-eplb), the recorder's pass boundaries, and the idle pass that
DP-attention needs.

Every rank of the EP group runs the same number of passes (under TP its scheduler is
in lockstep with rank 0's; under DP-attention an idle rank runs `idle_pass` instead),
so counting passes tells every rank, at the same moment, that it is time to
rebalance. A rebalance:

1. sums the load every rank counted since the last one (all-reduce);
2. computes the new placement (eplb_algorithm.py) on rank 0 and broadcasts it, so
   every rank installs the same one;
3. moves the weights: each new slot is filled from a replica of its expert on the same
   rank when there is one, else from the first rank that holds one, by point-to-point
   sends posted together (torch.distributed's batch_isend_irecv: NCCL or gloo);
4. installs the new slot map in place.

It runs after a pass has finished and before the next one starts, so no request sees
a half-moved layer and none is dropped: a request only ever notices the change as the
floating-point noise of a different summation order.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from radixserve.layers.moe.ep.ep_moe import EpFusedMoE
from radixserve.layers.moe.ep.eplb_algorithm import rebalance_experts
from radixserve.layers.moe.ep.state import ExpertState

logger = logging.getLogger(__name__)


class ExpertParallelRuntime:
    def __init__(self, state: ExpertState, model: nn.Module) -> None:
        self.state = state
        self.layers = sorted((m for m in model.modules() if isinstance(m, EpFusedMoE)),
                             key=lambda m: m.layer_id)
        self.passes = 0
        self.rebalances = 0

    # --- pass boundaries ------------------------------------------------------------

    def after_pass(self) -> None:
        if self.state.recorder is not None:
            self.state.recorder.end_pass()
        cfg = self.state.config
        self.passes += 1
        if cfg.enable_eplb and self.passes % cfg.eplb_rebalance_num_iterations == 0:
            self.rebalance()

    @torch.inference_mode()
    def idle_pass(self) -> None:
        """A pass with no tokens: the MoE layers' collectives, in layer order, so that
        the ranks that do have tokens can complete theirs (DP-attention's IDLE batch)."""
        device = self.state.group.device
        for layer in self.layers:
            x = torch.zeros(0, layer.hidden_size, dtype=layer.w13_weight.dtype, device=device)
            top_k = 1
            layer(x, torch.zeros(0, top_k, dtype=torch.float32, device=device),
                  torch.zeros(0, top_k, dtype=torch.int32, device=device))
        self.after_pass()

    # --- recorder -------------------------------------------------------------------

    def start_record(self) -> None:
        self._recorder().start()

    def stop_record(self) -> None:
        self._recorder().stop()

    def dump_record(self, path: str | Path | None = None, reduce: bool = True
                    ) -> dict[str, Any]:
        """The record (written to `path` too, with torch.save, if given). `reduce`: summed
        over the EP group, a collective that every rank calls at the same point; else
        this rank's own."""
        out = self._recorder().dump(self.state.group if reduce else None)
        out["moe_layers"] = [m.layer_id for m in self.layers]
        if path is not None:
            torch.save(out, path)
        return out

    def _recorder(self) -> Any:
        if self.state.recorder is None:
            raise ValueError("the expert distribution recorder is off: start the server "
                             "with --expert-distribution-recorder-mode")
        return self.state.recorder

    # --- EPLB -----------------------------------------------------------------------

    @torch.inference_mode()
    def rebalance(self) -> None:
        state, group = self.state, self.state.group
        loc = state.location
        load = group.all_reduce_sum(state.eplb_load.clone())
        ids = [m.layer_id for m in self.layers]
        new = loc.physical_to_logical.clone()
        if group.rank == 0:
            new[ids] = rebalance_experts(
                load[ids].cpu(), loc.num_physical, group.size, state.num_expert_groups,
                state.config.nnodes, state.config.eplb_algorithm).to(new.device)
        new = group.broadcast(new, 0)
        old = loc.physical_to_logical.cpu()
        new_cpu = new.cpu()
        for layer in self.layers:
            move_layer_weights(layer, old[layer.layer_id].tolist(),
                               new_cpu[layer.layer_id].tolist())
        loc.update(new_cpu)
        state.eplb_load.zero_()
        self.rebalances += 1
        logger.info("EPLB: rebalance %d after %d passes", self.rebalances, self.passes)


def move_layer_weights(layer: EpFusedMoE, old: list[int], new: list[int]) -> None:
    """Fill this rank's slots for placement `new` from where placement `old` holds each
    expert; every rank computes the same plan, so sends and receives pair up."""
    group = layer.state.group
    per_rank = layer.state.location.slots_per_rank
    me = group.rank
    w13, w2 = layer.w13_weight.data, layer.w2_weight.data
    before13, before2 = w13.clone(), w2.clone()

    def source(dst: int, expert: int) -> int:
        """The old slot a new slot on rank `dst` copies from: one on `dst` if any."""
        local = [s for s in range(dst * per_rank, (dst + 1) * per_rank) if old[s] == expert]
        return local[0] if local else old.index(expert)

    sends: list[tuple[torch.Tensor, int]] = []
    recvs: list[tuple[torch.Tensor, int]] = []
    for slot, expert in enumerate(new):
        dst = slot // per_rank
        src = source(dst, expert)
        if src // per_rank == dst:
            if dst == me:
                w13[slot - me * per_rank].copy_(before13[src - me * per_rank])
                w2[slot - me * per_rank].copy_(before2[src - me * per_rank])
        elif dst == me:
            recvs += [(w13[slot - me * per_rank], src // per_rank),
                      (w2[slot - me * per_rank], src // per_rank)]
        elif src // per_rank == me:
            sends += [(before13[src - me * per_rank], dst), (before2[src - me * per_rank], dst)]
    group.send_recv(sends, recvs)
