"""Token-slot allocator over the KV pool, in pages of `page_size` slots.

Slot 0 is reserved (see memory_pool.py), so page 0 is never handed out. A request's
tokens fill its last page before a new page is taken, so every page belongs to exactly
one owner (one request, or one radix-tree node once the request is cached): freeing a
token frees its whole page, and a page is returned exactly once.
"""

from __future__ import annotations

import torch


class TokenToKVPoolAllocator:
    def __init__(self, size: int, page_size: int, device: str | torch.device) -> None:
        if size < page_size:
            raise ValueError(f"KV pool of {size} tokens is smaller than one page ({page_size})")
        self.page_size = page_size
        self.device = device
        self.num_pages = size // page_size
        self.size = self.num_pages * page_size
        self.clear()

    def clear(self) -> None:
        # Pages 1..num_pages; page p covers slots [p * page_size, (p + 1) * page_size).
        # With page_size 1 that is slots 1..size, leaving slot 0 reserved.
        self.free_pages: list[int] = list(range(self.num_pages, 0, -1))
        self._free_set = set(self.free_pages)

    def available_size(self) -> int:
        return len(self.free_pages) * self.page_size

    def _take_pages(self, n: int) -> list[int] | None:
        if n > len(self.free_pages):
            return None
        pages = self.free_pages[-n:] if n else []
        del self.free_pages[len(self.free_pages) - n:]
        self._free_set.difference_update(pages)
        return pages

    def alloc(self, num_tokens: int) -> torch.Tensor | None:
        """Fresh pages for `num_tokens` tokens starting on a page boundary."""
        return self.alloc_for_seq(-1, 0, num_tokens)

    def alloc_for_seq(self, last_loc: int, cur_len: int, num_tokens: int) -> torch.Tensor | None:
        """Slots for `num_tokens` more tokens of a sequence now `cur_len` long whose last
        token sits in slot `last_loc` (ignored when cur_len is page-aligned)."""
        ps = self.page_size
        used_in_page = cur_len % ps
        room = (ps - used_in_page) % ps if cur_len > 0 else 0
        from_last = min(room, num_tokens)
        rest = num_tokens - from_last
        pages = self._take_pages(-(-rest // ps))
        if pages is None:
            return None
        out: list[int] = []
        if from_last:
            out.extend(range(last_loc + 1, last_loc + 1 + from_last))
        for p in pages:
            out.extend(range(p * ps, p * ps + ps))
        return torch.tensor(out[:num_tokens], dtype=torch.int64)

    def pages_needed(self, cur_len: int, num_tokens: int) -> int:
        ps = self.page_size
        room = (ps - cur_len % ps) % ps if cur_len > 0 else 0
        return -(-max(0, num_tokens - room) // ps)

    def free(self, indices: torch.Tensor) -> None:
        if indices.numel() == 0:
            return
        pages = torch.unique(indices.to(torch.int64) // self.page_size).tolist()
        for p in pages:
            if p in self._free_set or p == 0:
                raise RuntimeError(f"KV page {p} freed twice (or reserved page freed)")
        self._free_set.update(pages)
        self.free_pages.extend(pages)
