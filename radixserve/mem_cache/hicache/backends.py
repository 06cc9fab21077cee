"""The storage backends by --hicache-storage-backend name."""

from __future__ import annotations

from radixserve.mem_cache.hicache.file_storage import HiCacheFile
from radixserve.mem_cache.hicache.storage import HiCacheStorage, HiCacheStorageConfig


def make_storage(name: str, config: HiCacheStorageConfig) -> HiCacheStorage | None:
    """The named backend, or None (with a log line) when it cannot run here."""
    if name == "file":
        return HiCacheFile.open(config)
    if name == "mooncake":
        from radixserve.mem_cache.hicache.mooncake_storage import HiCacheMooncake

        return HiCacheMooncake.open(config)
    raise ValueError(f"unknown hicache storage backend {name!r}")
