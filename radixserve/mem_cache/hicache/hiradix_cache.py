"""HiRadixCache: the radix cache with host memory and storage below it.

Where a page's KV lives:
  device   a node of the radix tree (RadixCache, unchanged: locks, LRU, pages)
  host     an entry of the host page index, by page key (page_hash.py), in HostKVPool
  storage  a value of the storage backend, by the same key (file_storage.py)
A page key hashes the whole token prefix ending with the page, so the three tiers form
one tree of pages: a prefix matches as deep as its pages are found, tier after tier.

Moves between tiers:
  device → host   backups. write_through: when a page enters the tree;
                  write_back: when it is evicted from the device;
                  write_through_selective: when it is evicted, if its node was hit.
  host → storage  every page that enters the host pool is written out too (the
                  storage tier is written through, so a restart or a second server
                  finds everything the host ever held).
  host → gone     least recently used first, when the host pool needs room.
  storage/host → device   `load_back(req)`, at admission: the pages right after the
                  request's device match are found on the host (or read from storage
                  into the host), given device slots, inserted into the tree and
                  queued for copying. The copy runs at the start of the next forward,
                  layer by layer on its own stream (transfer.py).

Invariant that keeps queued copies safe: every pending load is issued (and the compute
stream made to wait for it) before any device slot leaves the tree or any host page is
reused, and the host entries a load reads stay locked until it is issued.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from radixserve.configs.hicache_config import HiCacheConfig
from radixserve.core.req import Req
from radixserve.mem_cache.allocator import TokenToKVPoolAllocator
from radixserve.mem_cache.hicache.backends import make_storage
from radixserve.mem_cache.hicache.host_index import HostEntry, HostPageIndex
from radixserve.mem_cache.hicache.host_pool import (DevicePool, HostKVPool, bytes_per_token,
                                                    device_kv_buffers)
from radixserve.mem_cache.hicache.page_hash import new_prefix_state, page_hashes
from radixserve.mem_cache.hicache.storage import HiCacheStorage, HiCacheStorageConfig
from radixserve.mem_cache.hicache.transfer import KVTransfer, LayerLoad
from radixserve.mem_cache.memory_pool import MLATokenToKVPool, ReqToTokenPool
from radixserve.mem_cache.radix_cache import MatchResult, RadixCache, TreeNode

logger = logging.getLogger(__name__)


@dataclass
class HiCacheStats:
    """Hits per tier and bytes moved per tier; `load_back_s` is the host time spent
    finding, reading and copying pages back. Hits are counted when the load is queued
    (a request whose admission then fails may count again on its next try)."""

    host_hit_tokens: int = 0  # tokens loaded back from host memory
    storage_hit_tokens: int = 0  # tokens loaded back from storage
    bytes_device_to_host: int = 0
    bytes_host_to_device: int = 0
    bytes_host_to_storage: int = 0
    bytes_storage_to_host: int = 0
    load_back_s: float = 0.0


def host_pool_tokens(config: HiCacheConfig, device_tokens: int, token_bytes: int) -> int:
    if config.size_gb > 0:
        return config.size_gb * (1 << 30) // token_bytes
    return int(device_tokens * config.ratio)


def layout_signature(pool: DevicePool, page_size: int) -> str:
    parts = [f"page={page_size}"] + [
        f"{bufs[0].dtype}x{len(bufs)}x{tuple(bufs[0].shape[1:])}"
        for bufs in device_kv_buffers(pool)]
    return ";".join(parts)


class HiRadixCache(RadixCache):
    def __init__(self, req_to_token_pool: ReqToTokenPool,
                 token_to_kv_pool_allocator: TokenToKVPoolAllocator, page_size: int,
                 device_pool: DevicePool, config: HiCacheConfig) -> None:
        super().__init__(req_to_token_pool, token_to_kv_pool_allocator, page_size)
        self.config = config
        self.device_pool = device_pool
        self.token_bytes = bytes_per_token(device_pool)
        self.host_pool = HostKVPool(device_pool, host_pool_tokens(
            config, token_to_kv_pool_allocator.size, self.token_bytes), page_size)
        self.host_index = HostPageIndex()
        self.transfer = KVTransfer(device_kv_buffers(device_pool), self.host_pool.buffers,
                                   config.io_backend, page_size)
        self.storage: HiCacheStorage | None = None
        if config.storage_backend is not None:
            self.storage = make_storage(config.storage_backend, HiCacheStorageConfig(
                model_name=config.model_name,
                layout_signature=layout_signature(device_pool, page_size),
                page_nbytes=self.host_pool.page_nbytes(),
                is_mla_model=isinstance(device_pool, MLATokenToKVPool),
                extra_config=config.extra_config))
        self.stats = HiCacheStats()
        # Loads queued at admission, not yet issued: (host rows, device slots).
        self._queued: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._load: LayerLoad | None = None
        self._load_entries: list[HostEntry] = []  # locked until their load is issued
        self._to_storage: list[tuple[str, HostEntry, torch.cuda.Event | None]] = []
        self._backups: list[tuple[list[str], torch.Tensor]] = []  # gathered during evict
        self._hits: dict[int, int] = {}  # node id -> matches (write_through_selective)
        self._evict_memo: dict[int, tuple["hashlib._Hash", list[str]]] = {}
        logger.info("HiCache: host pool of %d tokens (%.2f GiB), write policy %s, storage %s",
                    self.host_pool.size, self.host_pool.size * self.token_bytes / 2**30,
                    config.write_policy, config.storage_backend or "none")

    # --- tier accounting -------------------------------------------------------------

    def host_cached_pages(self) -> int:
        return len(self.host_index)

    def host_locked_pages(self) -> int:
        return self.host_index.locked_pages()

    def loads_pending(self) -> bool:
        return bool(self._queued) or self._load is not None

    def tier_stats(self) -> dict[str, Any]:
        """HiCache's counters and occupancy, under "hicache" in /get_server_info."""
        info: dict[str, Any] = asdict(self.stats)
        info.update(host_pool_pages=self.host_pool.num_pages,
                    host_cached_pages=self.host_cached_pages(),
                    host_locked_pages=self.host_locked_pages())
        if self.storage is not None:
            info["storage"] = self.storage.get_stats()
        return {"hicache": info}

    # --- device tier: the tree -------------------------------------------------------

    def match_prefix(self, key: list[int]) -> MatchResult:
        match = super().match_prefix(key)
        if self.config.write_policy == "write_through_selective":
            node = match.last_node
            while node is not self.root_node:
                self._hits[node.id] = self._hits.get(node.id, 0) + 1
                node = node.parent
        return match

    def insert(self, key: list[int], value: torch.Tensor) -> int:
        present = super().insert(key, value)
        if self.config.write_policy == "write_through" and len(key) > present:
            ps = self.page_size
            first = present // ps
            self._backup(page_hashes(key, ps, first_page=first), value[first * ps:])
        return present

    def evict(self, num_tokens: int) -> int:
        # A queued load may target slots of a node that is about to go (its request was
        # not admitted after all): issue it first. This costs the overlap of those loads.
        self._finish_loads()
        self._evict_memo = {}
        freed = super().evict(num_tokens)
        self._evict_memo = {}
        # Enqueued before evict returns, so before the freed slots are handed out again.
        for keys, slots in self._backups:
            self._backup(keys, slots)
        self._backups = []
        return freed

    def _release_evicted(self, node: TreeNode) -> None:
        policy = self.config.write_policy
        if policy != "write_through_selective" or self._hits.get(node.id, 0) > 0:
            self._backups.append((self._node_page_keys(node, self._evict_memo), node.value))
        self._hits.pop(node.id, None)
        super()._release_evicted(node)

    def cache_finished_req(self, req: Req) -> None:
        super().cache_finished_req(req)
        if self._queued:
            # Usually the load of a request whose admission failed after its load-back:
            # no forward may come to issue it (a decode that a CUDA graph replays never
            # calls the layer hook), so issue it now rather than hold its host pages.
            # Issuing early is always safe; it only costs the overlap.
            self._finish_loads()

    def reset(self) -> None:
        self._finish_loads()
        self._drain_storage(block=True)
        super().reset()
        self.host_index.clear()
        self.host_pool.clear()
        self._hits.clear()

    def _node_page_keys(self, node: TreeNode,
                        memo: dict[int, tuple["hashlib._Hash", list[str]]]) -> list[str]:
        """Page keys of node's own pages; memo holds each visited node's end state."""
        if node.id in memo:
            return memo[node.id][1]
        path: list[TreeNode] = []
        top = node
        while top is not self.root_node and top.id not in memo:
            path.append(top)
            assert top.parent is not None
            top = top.parent
        state = (new_prefix_state(self.page_size) if top is self.root_node
                 else memo[top.id][0].copy())
        keys: list[str] = []
        for m in reversed(path):
            keys = page_hashes(m.key, self.page_size, state)
            memo[m.id] = (state.copy(), keys)
        return keys

    def _depth(self, node: TreeNode) -> int:
        depth = 0
        while node is not self.root_node:
            depth += len(node.key)
            assert node.parent is not None
            node = node.parent
        return depth

    # --- device → host -----------------------------------------------------------------

    def _backup(self, keys: list[str], slots: torch.Tensor) -> None:
        """Copy the pages (keys[i] at slots[i * page_size:...]) missing from the host."""
        ps = self.page_size
        todo = [i for i, k in enumerate(keys) if k not in self.host_index]
        pages = self._alloc_host_pages(len(todo))
        todo = todo[:len(pages)]
        if not todo:
            return
        dev = torch.cat([slots[i * ps:(i + 1) * ps] for i in todo])
        event = self.transfer.to_host(dev, self.host_pool.slots(pages))
        self.stats.bytes_device_to_host += len(dev) * self.token_bytes
        # Deepest first, so that a prefix's first pages are the most recently used.
        for i, page in reversed(list(zip(todo, pages))):
            entry = self.host_index.add(keys[i], page)
            if self.storage is not None:
                entry.lock += 1
                self._to_storage.append((keys[i], entry, event))
        self._drain_storage(block=False)

    def _alloc_host_pages(self, n: int) -> list[int]:
        """Up to n free host pages, evicting the least recently used entries."""
        pool = self.host_pool
        while pool.available_pages() < n:
            victim = self.host_index.pop_lru()
            if victim is not None:
                pool.free_page(victim[1].page)
            elif self._to_storage:
                self._drain_storage(block=True)
            elif self.loads_pending():
                self._finish_loads()
            else:
                break
        return pool.alloc_pages(min(n, pool.available_pages())) or []

    # --- host → storage ----------------------------------------------------------------

    def _drain_storage(self, block: bool) -> None:
        """Write out the host pages whose device copy has landed (all of them: block)."""
        keep = []
        for key, entry, event in self._to_storage:
            if event is not None and not block and not event.query():
                keep.append((key, entry, event))
                continue
            if event is not None:
                event.synchronize()
            if self.storage is not None and not self.storage.exists(key):
                if self.storage.set(key, self.host_pool.read_page(entry.page)):
                    self.stats.bytes_host_to_storage += self.host_pool.page_nbytes()
            entry.in_storage = True
            entry.lock -= 1
        self._to_storage = keep

    def flush_storage(self) -> None:
        """Write every page still waiting for the storage tier (before a shutdown)."""
        self._drain_storage(block=True)

    # --- host/storage → device ----------------------------------------------------------

    def load_back(self, req: Req) -> None:
        """Extend req's device match with the pages that follow it on the host or in
        storage: they get device slots and tree nodes now, their copy is queued for the
        next forward. req.prefix_indices and req.last_node are updated in place."""
        node = req.last_node
        if node is None or not req.fill_ids:
            return
        ps = self.page_size
        n = len(req.prefix_indices)
        # The last token is always computed (its logits); placeholders key by their item.
        ids = req.key_ids(req.fill_ids[:-1])
        aligned = len(ids) - len(ids) % ps
        # A prefix trimmed for prompt logprobs must not grow again.
        if aligned <= n or n != self._depth(node):
            return
        t0 = time.perf_counter()
        self._drain_storage(block=False)
        wanted = page_hashes(ids[:aligned], ps, first_page=n // ps)
        entries: list[HostEntry] = []
        for key in wanted:
            entry = self.host_index.get(key)
            if entry is None:
                break
            entry.lock += 1
            entries.append(entry)
        host_hits = len(entries)
        entries += self._read_from_storage(wanted[host_hits:])
        self.host_index.touch(wanted[:len(entries)])
        dev = self._alloc_device(len(entries), node)
        for entry in entries[len(dev) // ps:]:
            entry.lock -= 1
        entries = entries[:len(dev) // ps]
        if entries:
            self._queue_load(entries, dev)
            end = n + len(dev)
            present = super().insert(ids[:end], torch.cat([req.prefix_indices, dev]))
            assert present == n, (present, n)
            match = super().match_prefix(ids[:end])
            req.prefix_indices, req.last_node = match.device_indices, match.last_node
            from_host = min(host_hits, len(entries)) * ps
            self.stats.host_hit_tokens += from_host
            self.stats.storage_hit_tokens += len(dev) - from_host
            self.stats.bytes_host_to_device += len(dev) * self.token_bytes
        self.stats.load_back_s += time.perf_counter() - t0

    def _read_from_storage(self, keys: list[str]) -> list[HostEntry]:
        """Read the leading stored pages of keys into the host pool (locked entries)."""
        if self.storage is None or not keys:
            return []
        count = self.storage.batch_exists(keys)
        pages = self._alloc_host_pages(count)
        if pages and self.transfer.cuda:
            # A freed host page may still be the source of a load the device has not run
            # yet; the host is about to overwrite it.
            self.transfer.load_stream.synchronize()
        entries = []
        nbytes = self.host_pool.page_nbytes()
        for key, page in zip(keys, pages):
            if key in self.host_index:
                # Still on the host (a locked page outlives its parent's eviction): an
                # entry added over it would orphan its host page.
                break
            data = self.storage.get(key)
            if data is None or data.numel() != nbytes:
                break
            self.host_pool.write_page(page, data)
            entry = self.host_index.add(key, page)
            entry.in_storage = True
            entry.lock += 1
            entries.append(entry)
            self.stats.bytes_storage_to_host += nbytes
        for page in pages[len(entries):]:
            self.host_pool.free_page(page)
        return entries

    def _alloc_device(self, num_pages: int, keep: TreeNode) -> torch.Tensor:
        """Device slots for up to num_pages pages (fewer if the device is full), without
        evicting the path to `keep`."""
        ps = self.page_size
        allocator = self.token_to_kv_pool_allocator
        self.inc_lock_ref(keep)
        short = num_pages * ps - allocator.available_size()
        if short > 0:
            self.evict(short)
        self.dec_lock_ref(keep)
        pages = min(num_pages, allocator.available_size() // ps)
        slots = allocator.alloc(pages * ps) if pages else None
        return slots if slots is not None else torch.empty(0, dtype=torch.int64)

    def _queue_load(self, entries: list[HostEntry], dev: torch.Tensor) -> None:
        self._queued.append((self.host_pool.slots([e.page for e in entries]), dev))
        self._load_entries.extend(entries)
        self.device_pool.layer_ready = self._layer_ready

    def _start_load(self) -> None:
        host = torch.cat([h for h, _ in self._queued])
        dev = torch.cat([d for _, d in self._queued])
        self._queued = []
        self._load = self.transfer.start_load(host, dev)

    def _layer_ready(self, layer: int) -> None:
        """The device pool's hook: called by each attention layer before it reads KV."""
        if self._load is None:
            if not self._queued:
                return
            self._start_load()
        assert self._load is not None
        t0 = time.perf_counter()
        self._load.wait(layer)
        self.stats.load_back_s += time.perf_counter() - t0
        if layer >= self.transfer.num_layers - 1:
            self._end_load()

    def _finish_loads(self) -> None:
        if self._load is None and self._queued:
            self._start_load()
        if self._load is not None:
            t0 = time.perf_counter()
            self._load.finish()
            self.stats.load_back_s += time.perf_counter() - t0
            self._end_load()

    def _end_load(self) -> None:
        for entry in self._load_entries:
            entry.lock -= 1
        self._load_entries = []
        self._load = None
        self.device_pool.layer_ready = None
