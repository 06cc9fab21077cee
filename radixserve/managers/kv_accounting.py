"""KV accounting: which KV slots and request rows each request holds, and the prefix
cache they return to. The scheduler's parts ask here instead of touching the pools.

The prefix cache is the seam of the cache tiers: a RadixCache (or a ChunkCache with
--disable-radix-cache) today, a cache that also loads from host memory and storage
(HiCache) later, all behind the same calls.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from radixserve.core.req import Req
from radixserve.configs.hicache_config import HiCacheConfig
from radixserve.mem_cache.allocator import TokenToKVPoolAllocator
from radixserve.mem_cache.chunk_cache import ChunkCache
from radixserve.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool, ReqToTokenPool
from radixserve.mem_cache.radix_cache import MatchResult, RadixCache
from radixserve.mem_cache.row_tail import free_row_tail, slot_at


DevicePool = MHATokenToKVPool | MLATokenToKVPool


class PrefixCache(Protocol):
    """What the scheduler needs of a prefix cache (RadixCache, ChunkCache)."""

    page_size: int

    def match_prefix(self, key: list[int]) -> MatchResult: ...
    def inc_lock_ref(self, node: object) -> int: ...
    def dec_lock_ref(self, node: object) -> int: ...
    def evict(self, num_tokens: int) -> int: ...
    def cache_finished_req(self, req: Req) -> None: ...
    def cache_unfinished_req(self, req: Req) -> None: ...
    def evictable_size(self) -> int: ...
    def protected_size(self) -> int: ...
    def reset(self) -> None: ...
    # Extend a fresh request's device match with KV kept below the device (HiCache's
    # host memory and storage), before admission sizes its prefill; a no-op otherwise.
    def load_back(self, req: Req) -> None: ...
    # Counters of the tiers below the device, for /get_server_info ({} without them).
    def tier_stats(self) -> dict[str, Any]: ...


def make_prefix_cache(req_to_token_pool: ReqToTokenPool, allocator: TokenToKVPoolAllocator,
                      page_size: int, disable_radix_cache: bool,
                      hicache: HiCacheConfig | None = None,
                      device_pool: DevicePool | None = None) -> PrefixCache:
    if hicache is not None and hicache.enable:
        from radixserve.mem_cache.hicache import HiRadixCache

        assert device_pool is not None, "HiCache copies from the device KV pool"
        return HiRadixCache(req_to_token_pool, allocator, page_size, device_pool, hicache)
    cache_cls = ChunkCache if disable_radix_cache else RadixCache
    return cache_cls(req_to_token_pool, allocator, page_size)


class KVAccounting:
    def __init__(self, req_to_token_pool: ReqToTokenPool, allocator: TokenToKVPoolAllocator,
                 tree_cache: PrefixCache, page_size: int) -> None:
        self.req_to_token_pool = req_to_token_pool
        self.allocator = allocator
        self.tree_cache = tree_cache
        self.page_size = page_size

    def free_or_evictable(self) -> int:
        """Slots a batch could still get: free ones plus unlocked cached ones."""
        return self.allocator.available_size() + self.tree_cache.evictable_size()

    def decode_need(self, reqs: list[Req]) -> int:
        """KV slots the next decode step of `reqs` takes (one each, or a new page each)."""
        if self.page_size == 1:
            return len(reqs)
        return sum(self.allocator.pages_needed(r.kv_committed_len, 1) for r in reqs) \
            * self.page_size

    # --- prefill ------------------------------------------------------------------

    def claim_row(self, req: Req) -> bool:
        """A request row for a fresh request, holding its matched prefix (locked)."""
        self.tree_cache.inc_lock_ref(req.last_node)
        row = self.req_to_token_pool.alloc()
        if row is None:
            self.tree_cache.dec_lock_ref(req.last_node)
            return False
        req.req_pool_idx = row
        if len(req.prefix_indices):
            self.req_to_token_pool.write(row, 0, req.prefix_indices)
            req.last_loc = int(req.prefix_indices[-1])
        req.kv_committed_len = len(req.prefix_indices)
        return True

    def load_back(self, req: Req) -> None:
        """Bring the KV that follows the request's matched prefix back to the device
        from host memory or storage (HiCache), so that it counts as cached."""
        self.tree_cache.load_back(req)

    def release_row(self, req: Req) -> None:
        """Undo `claim_row` (its admission failed)."""
        self.tree_cache.dec_lock_ref(req.last_node)
        self.req_to_token_pool.free(req.req_pool_idx)
        req.req_pool_idx = None
        req.kv_committed_len = 0

    def alloc_for_req(self, req: Req, n: int) -> torch.Tensor | None:
        """KV slots for the next n tokens of req, evicting cached prefixes if needed."""
        cur = req.kv_committed_len
        self._make_room(self.allocator.pages_needed(cur, n) * self.page_size)
        slots = self.allocator.alloc_for_seq(req.last_loc, cur, n)
        if slots is not None:
            self.req_to_token_pool.write(req.req_pool_idx, cur, slots)
            req.last_loc = int(slots[-1])
        return slots

    # --- decode -------------------------------------------------------------------

    def alloc_decode(self, reqs: list[Req]) -> torch.Tensor:
        """One new slot per request for a decode step (the caller checked they fit)."""
        self._make_room(self.decode_need(reqs))
        if self.page_size == 1:
            locs = self.allocator.alloc(len(reqs))
        else:
            locs = torch.cat([self.allocator.alloc_for_seq(r.last_loc, r.kv_committed_len, 1)
                              for r in reqs])
        # One scatter for the whole batch: a write per request would cost a device
        # copy each on the GPU.
        rows = torch.tensor([r.req_pool_idx for r in reqs], dtype=torch.int64)
        cols = torch.tensor([r.kv_committed_len for r in reqs], dtype=torch.int64)
        self.req_to_token_pool.write_many(rows, cols, locs)
        for r, loc in zip(reqs, locs.tolist()):
            r.last_loc = loc
        return locs

    # --- back to the cache ----------------------------------------------------------

    def cache_unfinished(self, req: Req) -> None:
        """Insert the request's KV into the tree; its row may now point at tree slots."""
        self.tree_cache.cache_unfinished_req(req)
        if len(req.prefix_indices):
            req.last_loc = int(req.prefix_indices[-1])

    def release(self, req: Req) -> None:
        """Return everything the request holds to the cache (finished or retracted).
        A pinned request (its KV still being sent to a decode server) keeps it; its
        owner releases it once the pin is lifted."""
        if req.req_pool_idx is not None and not req.kv_pinned:
            self.tree_cache.cache_finished_req(req)
            req.req_pool_idx = None

    def discard(self, req: Req, num_tokens: int) -> None:
        """Free the first `num_tokens` slots of a request that never computed them (KV
        pre-allocated for pages that did not arrive) without caching them: their
        contents are not the prompt's KV."""
        if req.req_pool_idx is None:
            return
        free_row_tail(self.req_to_token_pool, self.allocator, req.req_pool_idx, 0, num_tokens)
        self.release_row(req)

    def rollback(self, req: Req, num_tokens: int) -> None:
        """Give back the KV of the request's newest `num_tokens` committed positions
        (speculative tokens that were accepted, then cut off by a stop condition)."""
        keep = req.kv_committed_len - num_tokens
        free_row_tail(self.req_to_token_pool, self.allocator, req.req_pool_idx, keep,
                      req.kv_committed_len)
        req.kv_committed_len = keep
        req.last_loc = slot_at(self.req_to_token_pool, req.req_pool_idx, keep - 1)

    def make_room(self, num_tokens: int) -> None:
        """Evict cached prefixes until `num_tokens` slots are free, if they can be."""
        self._make_room(num_tokens)

    def _make_room(self, num_tokens: int) -> None:
        short = num_tokens - self.allocator.available_size()
        if short > 0:
            self.tree_cache.evict(short)
