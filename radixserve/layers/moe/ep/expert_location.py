"""Where each expert lives: physical slots, the ranks that own them, and the map that
routing uses to turn a logical expert id into a physical slot.

There are `num_physical = num_logical + redundant` slots per MoE layer, split evenly
over the EP ranks (rank r owns slots r*S .. r*S+S-1). A logical expert may have several
physical replicas (the redundant slots); every replica holds the same weights, so a
token may go to any of them. The choice is a pure function of the token's position
in the batch, which keeps routing deterministic and graph-capturable and spreads a hot
expert's tokens over its replicas.

The tensors live on the model's device and are updated in place by a rebalance, so a
captured graph keeps reading the current map.
"""

from __future__ import annotations

import torch


class ExpertLocation:
    def __init__(self, physical_to_logical: torch.Tensor, num_logical: int, ep_size: int,
                 device: torch.device | str = "cpu") -> None:
        """physical_to_logical [layers, num_physical]: the logical expert of each slot."""
        layers, num_physical = physical_to_logical.shape
        if num_physical % ep_size:
            raise ValueError(f"{num_physical} physical experts do not split over "
                             f"ep_size={ep_size} ranks")
        self.num_layers = layers
        self.num_logical = num_logical
        self.num_physical = num_physical
        self.ep_size = ep_size
        self.slots_per_rank = num_physical // ep_size
        # A logical expert has at most this many replicas.
        self.max_replicas = num_physical - num_logical + 1
        self.physical_to_logical = torch.empty(layers, num_physical, dtype=torch.int64,
                                               device=device)
        self.logical_to_physical = torch.empty(layers, num_logical, self.max_replicas,
                                               dtype=torch.int64, device=device)
        self.replica_count = torch.empty(layers, num_logical, dtype=torch.int64, device=device)
        self.update(physical_to_logical)

    @classmethod
    def trivial(cls, num_layers: int, num_logical: int, num_redundant: int, ep_size: int,
                device: torch.device | str = "cpu") -> "ExpertLocation":
        """Slot p holds expert p % num_logical: rank order, redundant slots wrap round."""
        p2l = torch.arange(num_logical + num_redundant).remainder(num_logical)
        return cls(p2l.expand(num_layers, -1).clone(), num_logical, ep_size, device)

    def update(self, physical_to_logical: torch.Tensor) -> None:
        """Install a new placement (same shape), in place."""
        p2l = physical_to_logical.to("cpu", torch.int64)
        check_placement(p2l, self.num_logical)
        l2p = torch.full((self.num_layers, self.num_logical, self.max_replicas), -1,
                         dtype=torch.int64)
        count = torch.zeros(self.num_layers, self.num_logical, dtype=torch.int64)
        for layer in range(self.num_layers):
            for slot, expert in enumerate(p2l[layer].tolist()):
                l2p[layer, expert, count[layer, expert]] = slot
                count[layer, expert] += 1
        self.physical_to_logical.copy_(p2l)
        self.logical_to_physical.copy_(l2p)
        self.replica_count.copy_(count)

    def local_slots(self, rank: int) -> range:
        return range(rank * self.slots_per_rank, (rank + 1) * self.slots_per_rank)

    def to_physical(self, layer: int, logical_ids: torch.Tensor) -> torch.Tensor:
        """logical ids [T, k] -> physical slots [T * k]: token t's choice takes replica
        t mod (that expert's replica count), so an expert's tokens alternate between its
        replicas."""
        flat = logical_ids.flatten().long()
        token = torch.arange(flat.numel(), device=flat.device) // max(logical_ids.shape[-1], 1)
        replica = token.remainder(self.replica_count[layer][flat])
        return self.logical_to_physical[layer][flat, replica]


def check_placement(physical_to_logical: torch.Tensor, num_logical: int) -> None:
    """Every logical expert needs at least one slot, and every slot a real expert."""
    if physical_to_logical.min() < 0 or physical_to_logical.max() >= num_logical:
        raise ValueError("placement names an expert outside 0..num_logical-1")
    for layer, row in enumerate(physical_to_logical):
        missing = set(range(num_logical)) - set(row.tolist())
        if missing:
            raise ValueError(f"layer {layer}: experts {sorted(missing)} have no slot")
