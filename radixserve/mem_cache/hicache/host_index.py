"""Which pages the host pool holds, by page key, least recently used first.

An entry is locked while a load-back still has to read it or while the storage tier
still has to write it out; locked entries are never evicted.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(slots=True)
class HostEntry:
    page: int
    lock: int = 0
    in_storage: bool = False


class HostPageIndex:
    def __init__(self) -> None:
        self._entries: OrderedDict[str, HostEntry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> HostEntry | None:
        return self._entries.get(key)

    def add(self, key: str, page: int) -> HostEntry:
        entry = HostEntry(page)
        self._entries[key] = entry
        return entry

    def touch(self, keys: list[str]) -> None:
        """Mark a prefix's pages used. Deepest first, so that the prefix's first pages
        are the most recent: eviction then trims prefixes from their end and never
        strands a page whose parent is gone."""
        for key in reversed(keys):
            if key in self._entries:
                self._entries.move_to_end(key)

    def pop_lru(self) -> tuple[str, HostEntry] | None:
        """Remove and return the least recently used unlocked entry."""
        for key, entry in self._entries.items():
            if entry.lock == 0:
                del self._entries[key]
                return key, entry
        return None

    def locked_pages(self) -> int:
        return sum(1 for e in self._entries.values() if e.lock)

    def clear(self) -> None:
        self._entries.clear()
