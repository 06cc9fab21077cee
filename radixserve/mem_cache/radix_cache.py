"""RadixAttention prefix cache: a radix tree over token ids whose nodes own KV slots.

Ownership is the whole game here. Every KV slot handed out by the allocator has exactly
one owner at any time: the allocator (free), one request (its row in req_to_token past
its tree-owned prefix), or one tree node. `insert` transfers slots from a request to the
tree; eviction transfers them from the tree back to the allocator. A request that
matched a prefix reads tree-owned slots and keeps them alive by locking the path
(`inc_lock_ref`); unlocked leaves are evicted least recently used first.

With page_size > 1 the tree works in whole pages: node keys are page-aligned, children
are keyed by their first page, and matches stop on a page boundary. Because the
allocator never lets two owners share a page, a node frees exactly its own pages.

Slot tensors in the tree and in `MatchResult` are int64 on the CPU (the allocator's
bookkeeping is CPU-side); callers move them to the pool's device when writing.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

from radixserve.core.req import Req
from radixserve.mem_cache.allocator import TokenToKVPoolAllocator
from radixserve.mem_cache.memory_pool import ReqToTokenPool

ChildKey = int | tuple[int, ...]

_node_ids = itertools.count()


def _empty_slots() -> torch.Tensor:
    return torch.empty(0, dtype=torch.int64)


@dataclass(slots=True, eq=False)
class TreeNode:
    """One edge of the radix tree: `key` tokens whose KV lives in `value` slots.

    `lock_ref` counts running requests whose matched path goes through this node;
    a node with lock_ref > 0 is never evicted. The root is locked forever.
    """

    key: list[int] = field(default_factory=list)
    value: torch.Tensor = field(default_factory=_empty_slots)
    parent: TreeNode | None = None
    children: dict[ChildKey, TreeNode] = field(default_factory=dict)
    lock_ref: int = 0
    last_access_time: int = 0
    # Unique and increasing: breaks ties in the eviction heap, so nodes are never compared.
    id: int = field(default_factory=lambda: next(_node_ids))


@dataclass
class MatchResult:
    device_indices: torch.Tensor  # int64 CPU slots of the matched prefix
    last_node: TreeNode  # deepest matched node (the root when nothing matched)


def _page_floor(n: int, page_size: int) -> int:
    return n - n % page_size


class RadixCache:
    def __init__(self, req_to_token_pool: ReqToTokenPool,
                 token_to_kv_pool_allocator: TokenToKVPoolAllocator, page_size: int = 1) -> None:
        if page_size != token_to_kv_pool_allocator.page_size:
            raise ValueError(f"cache page_size {page_size} differs from the allocator's "
                             f"{token_to_kv_pool_allocator.page_size}")
        self.req_to_token_pool = req_to_token_pool
        self.token_to_kv_pool_allocator = token_to_kv_pool_allocator
        self.page_size = page_size
        self._clock = 0
        self._init_root()

    def _init_root(self) -> None:
        self.root_node = TreeNode(lock_ref=1)
        self._evictable_size = 0
        self._protected_size = 0

    # --- tree primitives -------------------------------------------------------------

    def _child_key(self, key: list[int], pos: int) -> ChildKey:
        if self.page_size == 1:
            return key[pos]
        return tuple(key[pos:pos + self.page_size])

    def _match_len(self, node_key: list[int], key: list[int], pos: int) -> int:
        """Length of the common prefix of node_key and key[pos:], in whole pages."""
        n = min(len(node_key), len(key) - pos)
        if node_key[:n] == key[pos:pos + n]:
            return n  # the usual case, answered by one C-level comparison
        i = next(i for i in range(n) if node_key[i] != key[pos + i])
        return _page_floor(i, self.page_size)

    def _touch(self, node: TreeNode) -> None:
        node.last_access_time = self._clock

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Cut child's edge after n tokens; returns the new upper node.

        The lower part stays in the original object so that requests holding it as
        their `last_node` still unlock the full path.
        """
        parent = child.parent
        assert parent is not None
        upper = TreeNode(key=child.key[:n], value=child.value[:n], parent=parent,
                         lock_ref=child.lock_ref, last_access_time=child.last_access_time)
        child.key = child.key[n:]
        child.value = child.value[n:]
        child.parent = upper
        upper.children[self._child_key(child.key, 0)] = child
        parent.children[self._child_key(upper.key, 0)] = upper
        return upper

    # --- public API --------------------------------------------------------------------

    def match_prefix(self, key: list[int]) -> MatchResult:
        """Longest cached prefix of key (whole pages only), marking its path as used."""
        key = key[:_page_floor(len(key), self.page_size)]
        self._clock += 1
        node, pos = self.root_node, 0
        self._touch(node)
        values: list[torch.Tensor] = []
        while pos < len(key):
            child = node.children.get(self._child_key(key, pos))
            if child is None:
                break
            n = self._match_len(child.key, key, pos)
            if n < len(child.key):
                child = self._split(child, n)
            values.append(child.value)
            node, pos = child, pos + n
            self._touch(node)
        indices = torch.cat(values) if values else _empty_slots()
        return MatchResult(device_indices=indices, last_node=node)

    def insert(self, key: list[int], value: torch.Tensor) -> int:
        """Give the tree the slots `value` holding key's KV.

        Returns how many leading tokens were already cached: the tree keeps its own
        slots for those, so the caller still owns (and must free) value[:returned].
        The rest of value now belongs to the tree.
        """
        if len(key) != len(value):
            raise ValueError(f"key has {len(key)} tokens but value has {len(value)} slots")
        if len(key) % self.page_size:
            raise ValueError(f"key length {len(key)} is not a multiple of {self.page_size}")
        value = value.to(device="cpu", dtype=torch.int64).clone()
        self._clock += 1
        node, pos = self.root_node, 0
        self._touch(node)
        while pos < len(key):
            child_key = self._child_key(key, pos)
            child = node.children.get(child_key)
            if child is None:
                leaf = TreeNode(key=list(key[pos:]), value=value[pos:], parent=node,
                                last_access_time=self._clock)
                node.children[child_key] = leaf
                self._evictable_size += len(leaf.key)
                return pos
            n = self._match_len(child.key, key, pos)
            if n < len(child.key):
                child = self._split(child, n)
            node, pos = child, pos + n
            self._touch(node)
        return pos

    def inc_lock_ref(self, node: TreeNode) -> int:
        """Lock the path root..node; returns the change in evictable_size (<= 0)."""
        delta = 0
        while node is not self.root_node:
            if node.lock_ref == 0:
                self._evictable_size -= len(node.key)
                self._protected_size += len(node.key)
                delta -= len(node.key)
            node.lock_ref += 1
            assert node.parent is not None
            node = node.parent
        return delta

    def dec_lock_ref(self, node: TreeNode) -> int:
        """Unlock the path root..node; returns the change in evictable_size (>= 0)."""
        delta = 0
        while node is not self.root_node:
            if node.lock_ref <= 0:
                raise RuntimeError("dec_lock_ref on a node that is not locked")
            if node.lock_ref == 1:
                self._evictable_size += len(node.key)
                self._protected_size -= len(node.key)
                delta += len(node.key)
            node.lock_ref -= 1
            assert node.parent is not None
            node = node.parent
        return delta

    def evict(self, num_tokens: int) -> int:
        """Free unlocked leaves, least recently used first, until num_tokens slots are
        back in the allocator or nothing is evictable; returns the slots freed."""
        heap = [(n.last_access_time, n.id, n) for n in self._nodes()
                if not n.children and n.lock_ref == 0]
        heapq.heapify(heap)
        freed = 0
        while freed < num_tokens and heap:
            _, _, node = heapq.heappop(heap)
            self._release_evicted(node)
            freed += len(node.value)
            self._evictable_size -= len(node.key)
            parent = node.parent
            assert parent is not None
            del parent.children[self._child_key(node.key, 0)]
            if parent is not self.root_node and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access_time, parent.id, parent))
        return freed

    def _release_evicted(self, node: TreeNode) -> None:
        """Give an evicted node's slots back (HiCache first copies them to the host)."""
        self.token_to_kv_pool_allocator.free(node.value)

    def load_back(self, req: Req) -> None:
        """Nothing lives below the device here (HiCache loads host pages back)."""

    def tier_stats(self) -> dict[str, Any]:
        return {}

    def evictable_size(self) -> int:
        return self._evictable_size

    def protected_size(self) -> int:
        return self._protected_size

    def total_size(self) -> int:
        """Tokens in the tree, counted by walking it (independent of the running sizes)."""
        return sum(len(n.key) for n in self._nodes())

    def all_slots(self) -> torch.Tensor:
        values = [n.value for n in self._nodes()]
        return torch.cat(values) if values else _empty_slots()

    def reset(self) -> None:
        """Drop the whole tree, returning its slots to the allocator. Only valid while no
        request holds a lock (their slots would be freed under them)."""
        if self._protected_size:
            raise RuntimeError(f"reset with {self._protected_size} locked tokens in the tree")
        self.token_to_kv_pool_allocator.free(self.all_slots())
        self._init_root()

    def _nodes(self) -> list[TreeNode]:
        """Every node except the root."""
        out: list[TreeNode] = []
        stack = list(self.root_node.children.values())
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    # --- requests ----------------------------------------------------------------------
    #
    # A request's row in req_to_token holds, for positions [0, kv_committed_len):
    #   [0, tree_len)                 tree-owned slots, kept alive by locking req.last_node
    #   [tree_len, kv_committed_len)  slots the request owns
    # where tree_len is len(req.prefix_indices) rounded down to a page (prefix_indices
    # may end with the request's own partial last page; see cache_unfinished_req).
    # Slots the request holds past kv_committed_len are the scheduler's to free.

    def _tree_len(self, req: Req) -> int:
        return _page_floor(len(req.prefix_indices), self.page_size)

    def _insert_req(self, req: Req, key: list[int], slots: torch.Tensor) -> int:
        """Insert the request's page-aligned KV and free its slots that duplicate the
        tree's. Returns the number of tokens of key the tree held before."""
        tree_len = self._tree_len(req)
        present = self.insert(key, slots)
        if present < min(tree_len, len(key)):
            # The request's locked prefix has vanished: its slots may be reused already.
            raise RuntimeError(f"request {req.rid}: tree lost its locked prefix "
                               f"({present} < {tree_len} tokens)")
        if present > tree_len:
            self.token_to_kv_pool_allocator.free(slots[tree_len:present])
        return present

    def _row_slots(self, req: Req, n: int) -> torch.Tensor:
        assert req.req_pool_idx is not None
        return self.req_to_token_pool.read(req.req_pool_idx, n)

    def cache_finished_req(self, req: Req) -> None:
        """Hand a finished (or retracted) request's KV to the tree and release its row
        and lock. Calling it again on the same request does nothing."""
        if req.req_pool_idx is not None:
            n = req.kv_committed_len
            aligned = _page_floor(n, self.page_size)
            slots = self._row_slots(req, n)
            self._insert_req(req, req.key_ids(req.all_ids[:aligned]), slots[:aligned])
            # The partial last page cannot enter the tree; free it unless it is tree-owned
            # (kv_committed_len can trail the matched prefix if the request ended early).
            tail_start = max(aligned, self._tree_len(req))
            if tail_start < n:
                self.token_to_kv_pool_allocator.free(slots[tail_start:])
            self.req_to_token_pool.free(req.req_pool_idx)
            req.req_pool_idx = None
        if req.last_node is not None:
            self.dec_lock_ref(req.last_node)
            req.last_node = None
        req.prefix_indices = _empty_slots()

    def cache_unfinished_req(self, req: Req) -> None:
        """Cache a still-running request's computed KV (after a prefill chunk) so that
        others can share it, and re-point the request at the tree's copy.

        Afterwards req.prefix_indices == req_to_token[row, :kv_committed_len]: the
        tree's slots for the page-aligned part, then the request's own slots for the
        partial last page, which stays with the request (it fills up on the next
        chunk). req.last_node is the locked node ending the aligned part.
        """
        assert req.req_pool_idx is not None
        n = req.kv_committed_len
        if n < len(req.prefix_indices):
            raise ValueError(f"request {req.rid}: kv_committed_len {n} is shorter than "
                             f"its prefix ({len(req.prefix_indices)})")
        aligned = _page_floor(n, self.page_size)
        key = req.key_ids(req.fill_ids[:aligned])
        slots = self._row_slots(req, n)
        self._insert_req(req, key, slots[:aligned])
        match = self.match_prefix(key)
        assert len(match.device_indices) == aligned
        self.req_to_token_pool.write(req.req_pool_idx, 0, match.device_indices)
        self.inc_lock_ref(match.last_node)
        if req.last_node is not None:
            self.dec_lock_ref(req.last_node)
        req.last_node = match.last_node
        req.prefix_indices = torch.cat([match.device_indices, slots[aligned:]])


def shared_prefix_groups(last_nodes: list[TreeNode | None], min_len: int
                         ) -> tuple[list[int], list[int]]:
    """Which requests of a batch share a cached prefix, from the nodes they lock.

    Returns, for each request, a group key (-1: no group) and the length of the prefix
    its group shares. A request joins the deepest node on its path that at least one
    other request also passes through, if that node ends at least min_len tokens deep;
    the members of a group then hold the same tree-owned KV slots for that prefix in
    their req_to_token rows. (A request can end up alone in its group when its sharers
    picked a deeper node; the caller drops such groups.)
    """
    paths: list[list[TreeNode]] = []
    passing: dict[int, int] = {}
    for node in last_nodes:
        path: list[TreeNode] = []
        while node is not None and node.parent is not None:  # the root shares nothing
            path.append(node)
            passing[node.id] = passing.get(node.id, 0) + 1
            node = node.parent
        paths.append(path)
    keys, lens = [], []
    for path in paths:
        depth = sum(len(n.key) for n in path)
        key = -1
        for node in path:  # deepest first
            if depth < min_len:
                break
            if passing[node.id] > 1:
                key = node.id
                break
            depth -= len(node.key)
        keys.append(key)
        lens.append(depth if key >= 0 else 0)
    return keys, lens
