"""This process's expert-parallel state: the placement, the recorder and the load
that EPLB balances, shared by every MoE layer of the model.

The ModelRunner installs it (`configure_experts`) before it builds the model, as the
TP group is installed before the layers read it; a process that never does sees no
state, and its MoE layers are plain FusedMoE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from radixserve.configs.ep_config import EpConfig, routed_experts
from radixserve.distributed.ep_group import EpGroup, ep_group_from_tp, get_ep_group, set_ep_group
from radixserve.distributed.parallel_state import TpGroup
from radixserve.layers.moe.ep.expert_distribution import ExpertDistributionRecorder
from radixserve.layers.moe.ep.expert_location import ExpertLocation


@dataclass
class ExpertState:
    config: EpConfig
    group: EpGroup
    location: ExpertLocation
    # Set when --expert-distribution-recorder-mode is.
    recorder: ExpertDistributionRecorder | None
    # EPLB's running count of (layer, logical expert) choices on this rank, since the
    # last rebalance; None without --enable-eplb.
    eplb_load: torch.Tensor | None
    num_expert_groups: int | None = None

    def record(self, layer: int, logical_ids: torch.Tensor) -> None:
        if self.recorder is not None:
            self.recorder.record(layer, logical_ids)
        if self.eplb_load is not None:
            flat = logical_ids.flatten().long()
            self.eplb_load[layer].index_add_(
                0, flat, torch.ones(flat.numel(), dtype=torch.int64, device=flat.device))


_STATE: ExpertState | None = None


def get_expert_state() -> ExpertState | None:
    return _STATE


def configure_experts(config: EpConfig, group: EpGroup, num_layers: int, num_logical: int,
                      device: torch.device, num_expert_groups: int | None = None
                      ) -> ExpertState | None:
    """Install the state for a model with `num_logical` routed experts per layer
    (None, and no state, when the model has none or no EP feature is on)."""
    global _STATE
    if not config.uses_expert_layers or num_logical == 0:
        _STATE = None
        return None
    location = ExpertLocation.trivial(num_layers, num_logical, config.ep_num_redundant_experts,
                                      group.size, device)
    mode = config.expert_distribution_recorder_mode
    recorder = (ExpertDistributionRecorder(mode, num_layers, num_logical, device)
                if mode is not None else None)
    load = (torch.zeros(num_layers, num_logical, dtype=torch.int64, device=device)
            if config.enable_eplb else None)
    _STATE = ExpertState(config, group, location, recorder, load, num_expert_groups)
    return _STATE


def clear_expert_state() -> None:
    global _STATE
    _STATE = None


def setup_expert_parallel(config: EpConfig, tp: TpGroup, hf_config: Any,
                          device: torch.device) -> ExpertState | None:
    """The ModelRunner's entry: pick the EP group (the TP world, or the DP-attention
    world this process joined) and install the state for this model's experts."""
    num_logical = routed_experts(hf_config)
    if not config.uses_expert_layers or num_logical == 0:
        clear_expert_state()  # plain FusedMoE (or a dense model)
        return None
    if config.enable_dp_attention:
        group = get_ep_group()
        if group.size != config.ep_size:
            raise ValueError(f"DP-attention needs the EP world of {config.ep_size} ranks "
                             f"joined first (init_dp_attention_group), have {group.size}")
    else:
        group = ep_group_from_tp(tp, config.ep_size, device)
        set_ep_group(group)
    groups = getattr(hf_config, "n_group", None)
    return configure_experts(config, group, hf_config.num_hidden_layers, int(num_logical),
                             device, int(groups) if groups else None)
