"""Cascade decoding plans: which requests of a decode batch attend a shared prefix together.

When many running requests share a cached prefix (a system prompt, few-shot examples),
plain decode attention reads that prefix's KV once per request. A cascade reads it once
per group: the group's queries attend the prefix in one pass, each request attends its
own remaining tokens, and the two partial results are merged by log-sum-exp
(`triton_ops.decode_attention`). The radix tree says who shares what
(`radix_cache.shared_prefix_groups`); this module turns that into the kernel's inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from radixserve.mem_cache.radix_cache import TreeNode, shared_prefix_groups

# Below this many shared tokens the prefix pass and the merge cost about what they save.
CASCADE_MIN_PREFIX = 256

# Rows of CascadePlan.packed.
PERM, KV_START, TILE_START, TILE_COUNT = range(4)


@dataclass(slots=True)
class CascadePlan:
    """Host tensors for one decode batch of B requests, uploaded with its other inputs."""

    # [4, B] int64: perm (batch indices, each group's members contiguous), kv_start (the
    # request's shared prefix length, 0 outside groups), tile_start and tile_count
    # (each tile: up to tile_size members of one group; past num_tiles, count 0).
    packed: torch.Tensor
    num_tiles: int
    max_prefix: int


def plan_cascade(group_keys: Sequence[int], prefix_lens: Sequence[int], tile_size: int
                 ) -> CascadePlan | None:
    """The plan for a batch whose request i is in group group_keys[i] (-1: none) sharing
    prefix_lens[i] tokens; None when no group has two members."""
    members: dict[int, list[int]] = {}
    for i, key in enumerate(group_keys):
        if key >= 0:
            members.setdefault(key, []).append(i)
    batch = len(group_keys)
    packed = torch.zeros(4, batch, dtype=torch.int64)
    perm: list[int] = []
    tiles: list[tuple[int, int]] = []
    kv_start = [0] * batch
    for group in members.values():
        if len(group) < 2:
            continue
        for first in range(0, len(group), tile_size):
            tiles.append((len(perm) + first, min(tile_size, len(group) - first)))
        perm.extend(group)
        for i in group:
            kv_start[i] = prefix_lens[i]
    if not tiles:
        return None
    packed[PERM, :len(perm)] = torch.tensor(perm)
    packed[KV_START] = torch.tensor(kv_start)
    packed[TILE_START, :len(tiles)] = torch.tensor([t[0] for t in tiles])
    packed[TILE_COUNT, :len(tiles)] = torch.tensor([t[1] for t in tiles])
    return CascadePlan(packed, len(tiles), max(kv_start))


class CascadePlanner:
    """Plans each decode batch from the tree nodes its requests lock. A running batch
    keeps its requests (and their nodes) for many steps, so the last plan is reused
    while the nodes are the same: a node split by a newcomer keeps its object and its
    depth, and the new upper node is shared by exactly the requests below it, so the
    groups cannot change without the batch changing."""

    def __init__(self, tile_size: int, min_prefix: int = CASCADE_MIN_PREFIX) -> None:
        self.tile_size = tile_size
        self.min_prefix = min_prefix
        self._last: tuple[tuple[int, ...], CascadePlan | None] | None = None

    def plan(self, last_nodes: list[TreeNode | None]) -> CascadePlan | None:
        key = tuple(-1 if n is None else n.id for n in last_nodes)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        plan = None
        if len(last_nodes) > 1:
            plan = plan_cascade(*shared_prefix_groups(last_nodes, self.min_prefix),
                                self.tile_size)
        self._last = (key, plan)
        return plan
