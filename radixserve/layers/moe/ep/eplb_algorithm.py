"""Expert placement from a measured load, after DeepSeek's EPLB.

Given each layer's load per logical expert (tokens routed to it), choose which
logical expert each physical slot holds so that the busiest GPU's load is as small as
possible:

* hierarchical (the experts come in groups, as DeepSeek-V2/V3's group-limited routing
  has them, and the groups divide over the nodes): pack whole groups onto nodes so each
  node's total load is even (tokens of a group then stay inside one node); inside each
  node, give the extra (redundant) slots to the experts whose load per replica is the
  highest, one slot at a time; then pack the node's replicas onto its GPUs, the same
  number on each, heaviest first onto the lightest GPU;
* global: the same with one node and one group, for any expert count.

A replica carries an equal share of its expert's load (routing spreads an expert's
tokens over its replicas evenly). Everything runs on the host in a few milliseconds
for DeepSeek-V3's 256 experts x 58 layers, and is deterministic for a given load.
"""

from __future__ import annotations

import torch


def rebalance_experts(load: torch.Tensor, num_physical: int, num_gpus: int,
                      num_groups: int | None = None, num_nodes: int = 1,
                      algorithm: str = "auto") -> torch.Tensor:
    """load [layers, logical] -> physical_to_logical [layers, num_physical], where slots
    g*S .. g*S+S-1 (S = num_physical / num_gpus) belong to GPU g."""
    hierarchical = algorithm == "deepseek_hierarchical" or (
        algorithm == "auto" and bool(num_groups) and num_groups % num_nodes == 0)
    if hierarchical:
        if not num_groups or num_groups % num_nodes:
            raise ValueError(f"hierarchical placement needs expert groups that divide over "
                             f"the nodes, got num_groups={num_groups} num_nodes={num_nodes}")
        return _hierarchical(load.double().cpu(), num_physical, num_groups, num_nodes,
                             num_gpus)
    return _hierarchical(load.double().cpu(), num_physical, 1, 1, num_gpus)


def gpu_loads(physical_to_logical: torch.Tensor, load: torch.Tensor, num_gpus: int
              ) -> torch.Tensor:
    """[layers, num_gpus]: each GPU's share of the load under a placement."""
    layers, num_physical = physical_to_logical.shape
    count = torch.zeros(load.shape, dtype=torch.float64)
    count.scatter_add_(1, physical_to_logical, torch.ones(physical_to_logical.shape,
                                                           dtype=torch.float64))
    per_slot = load.double().gather(1, physical_to_logical) / count.gather(1,
                                                                         physical_to_logical)
    return per_slot.view(layers, num_gpus, num_physical // num_gpus).sum(-1)


def balanced_packing(weight: torch.Tensor, num_packs: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [rows, n] -> (pack of each item, its index inside the pack), each pack
    taking exactly n / num_packs items: heaviest item first onto the lightest pack that
    still has room."""
    rows, n = weight.shape
    if n % num_packs:
        raise ValueError(f"{n} items do not split into {num_packs} equal packs")
    per_pack = n // num_packs
    pack = torch.empty(rows, n, dtype=torch.int64)
    index = torch.empty(rows, n, dtype=torch.int64)
    for row in range(rows):
        loads = [0.0] * num_packs
        sizes = [0] * num_packs
        for item in torch.argsort(weight[row], descending=True, stable=True).tolist():
            target = min((p for p in range(num_packs) if sizes[p] < per_pack),
                         key=lambda p: (loads[p], p))
            pack[row, item], index[row, item] = target, sizes[target]
            loads[target] += float(weight[row, item])
            sizes[target] += 1
    return pack, index


def replicate_experts(weight: torch.Tensor, num_physical: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [rows, n] -> (logical expert of each of num_physical replicas, replica
    count per expert): one replica each, then every extra one to the expert with the
    largest load per replica."""
    rows, n = weight.shape
    if num_physical < n:
        raise ValueError(f"{num_physical} slots cannot hold {n} experts")
    phy2log = torch.arange(n).repeat(rows, 1)
    count = torch.ones(rows, n, dtype=torch.int64)
    extra = []
    for _ in range(num_physical - n):
        hottest = (weight / count).argmax(-1)
        extra.append(hottest)
        count[torch.arange(rows), hottest] += 1
    if extra:
        phy2log = torch.cat([phy2log, torch.stack(extra, 1)], 1)
    return phy2log, count


def _hierarchical(load: torch.Tensor, num_physical: int, num_groups: int, num_nodes: int,
                  num_gpus: int) -> torch.Tensor:
    layers, num_logical = load.shape
    for what, a, b in (("experts", num_logical, num_groups), ("GPUs", num_gpus, num_nodes),
                       ("physical slots", num_physical, num_gpus)):
        if a % b:
            raise ValueError(f"{what}={a} is not divisible by {b}")
    group_size = num_logical // num_groups
    experts_per_node = num_logical // num_nodes
    slots_per_node = num_physical // num_nodes
    # 1. Groups onto nodes; renumber experts node-major ("node-local ids").
    group_node, group_pos = balanced_packing(load.view(layers, num_groups, group_size).sum(-1),
                                             num_nodes)
    group_new = group_node * (num_groups // num_nodes) + group_pos  # [layers, groups]
    local_of = (group_new.unsqueeze(-1) * group_size + torch.arange(group_size)).flatten(1)
    logical_of = torch.empty_like(local_of)
    logical_of.scatter_(1, local_of, torch.arange(num_logical).expand(layers, -1).clone())
    # 2. Inside each node, replicate its experts into its slots.
    node_load = load.gather(1, logical_of).view(layers * num_nodes, experts_per_node)
    phy2local, count = replicate_experts(node_load, slots_per_node)
    # 3. Each node's replicas onto its GPUs, by load per replica.
    per_replica = node_load.gather(1, phy2local) / count.gather(1, phy2local)
    gpu, pos = balanced_packing(per_replica, num_gpus // num_nodes)
    slot = gpu * (num_physical // num_gpus) + pos  # node-relative slot of each replica
    slot_to_local = torch.empty_like(phy2local)
    slot_to_local.scatter_(1, slot, phy2local)
    node_offset = (torch.arange(num_nodes) * experts_per_node).repeat(layers)
    local = (slot_to_local + node_offset.unsqueeze(1)).view(layers, num_physical)
    return logical_of.gather(1, local)
