"""The cache used with --disable-radix-cache: RadixCache's interface, no reuse.

Nothing is ever shared, so every slot a request holds stays the request's own until it
finishes; "caching" a chunk only records which slots the next chunk builds on.
"""

from __future__ import annotations

from typing import Any

import torch

from radixserve.core.req import Req
from radixserve.mem_cache.allocator import TokenToKVPoolAllocator
from radixserve.mem_cache.memory_pool import ReqToTokenPool
from radixserve.mem_cache.radix_cache import MatchResult, TreeNode


class ChunkCache:
    def __init__(self, req_to_token_pool: ReqToTokenPool,
                 token_to_kv_pool_allocator: TokenToKVPoolAllocator, page_size: int = 1) -> None:
        self.req_to_token_pool = req_to_token_pool
        self.token_to_kv_pool_allocator = token_to_kv_pool_allocator
        self.page_size = page_size
        # Returned as every match's last_node so callers can lock/unlock it uniformly.
        self.root_node = TreeNode(lock_ref=1)

    def match_prefix(self, key: list[int]) -> MatchResult:
        return MatchResult(device_indices=torch.empty(0, dtype=torch.int64), last_node=self.root_node)

    def insert(self, key: list[int], value: torch.Tensor) -> int:
        """Take ownership of value and drop it at once: nothing was cached before and
        nothing is kept, so the caller frees nothing."""
        self.token_to_kv_pool_allocator.free(value)
        return 0

    def cache_finished_req(self, req: Req) -> None:
        """Free the request's KV and row. Calling it again does nothing."""
        if req.req_pool_idx is not None:
            self.token_to_kv_pool_allocator.free(
                self.req_to_token_pool.read(req.req_pool_idx, req.kv_committed_len))
            self.req_to_token_pool.free(req.req_pool_idx)
            req.req_pool_idx = None
        req.last_node = None
        req.prefix_indices = torch.empty(0, dtype=torch.int64)

    def cache_unfinished_req(self, req: Req) -> None:
        """The next chunk extends what this one computed; the request keeps ownership."""
        assert req.req_pool_idx is not None
        req.prefix_indices = self.req_to_token_pool.read(req.req_pool_idx, req.kv_committed_len)

    def evict(self, num_tokens: int) -> int:
        return 0

    def load_back(self, req: Req) -> None:
        """Nothing is cached, so nothing comes back."""

    def tier_stats(self) -> dict[str, Any]:
        return {}

    # None too: without a radix cache the scheduler never matches, so last_node stays None.
    def inc_lock_ref(self, node: TreeNode | None) -> int:
        return 0

    def dec_lock_ref(self, node: TreeNode | None) -> int:
        return 0

    def evictable_size(self) -> int:
        return 0

    def protected_size(self) -> int:
        return 0

    def total_size(self) -> int:
        return 0

    def reset(self) -> None:
        """Nothing to drop: the cache owns no slots."""

    def all_slots(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.int64)
