"""Giving back the KV slots at the end of a request's row (speculative drafts that the
verify pass rejected, or accepted tokens cut off by a stop condition).

Slots are owned by whole pages: a page that still holds a kept position stays with the
request (its next allocation continues in it, from the kept position's slot), and only
the pages wholly past the kept positions go back to the allocator.
"""

from __future__ import annotations

from radixserve.mem_cache.allocator import TokenToKVPoolAllocator
from radixserve.mem_cache.memory_pool import ReqToTokenPool


def free_row_tail(req_to_token_pool: ReqToTokenPool, allocator: TokenToKVPoolAllocator,
                  row: int, keep: int, end: int) -> None:
    """Free the slots of positions [keep, end) of `row`, page by page: positions that
    share a page with position keep - 1 keep their slots (their page is still in use)."""
    ps = allocator.page_size
    start = -(-keep // ps) * ps
    if start < end:
        allocator.free(req_to_token_pool.read(row, end)[start:])


def slot_at(req_to_token_pool: ReqToTokenPool, row: int, pos: int) -> int:
    """The KV slot of position `pos` of `row` (-1 before position 0)."""
    if pos < 0:
        return -1
    return int(req_to_token_pool.read(row, pos + 1)[pos])
