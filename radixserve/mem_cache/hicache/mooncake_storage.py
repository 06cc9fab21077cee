"""The `mooncake` storage backend: pages in a Mooncake distributed store (the
mooncake-transfer-engine package, an optional dependency), framed as the file backend
frames them (page_codec.py), under the same keys.

Settings come from --hicache-storage-backend-extra-config: master_server_address
(HOST:PORT of mooncake_master), metadata_server (its HTTP metadata URL, or P2PHANDSHAKE),
protocol (tcp or rdma), device_name, local_hostname, global_segment_size and
local_buffer_size (bytes this server lends to the store, and its staging buffer).
If the package or its libraries are missing, or the store cannot be reached, the tier
is off with a log line.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from radixserve.mem_cache.hicache.page_codec import decode_page, encode_page, page_tensor
from radixserve.mem_cache.hicache.storage import (HiCacheStorage, HiCacheStorageConfig,
                                                  key_suffix, layout_digest)

logger = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "master_server_address": "127.0.0.1:50051",
    "metadata_server": "http://127.0.0.1:8080/metadata",
    "protocol": "tcp",
    "device_name": "",
    "local_hostname": "127.0.0.1",
    "global_segment_size": 4 << 30,
    "local_buffer_size": 1 << 30,
}


class HiCacheMooncake(HiCacheStorage):
    def __init__(self, config: HiCacheStorageConfig, store: Any) -> None:
        self.store = store
        self.layout_digest = layout_digest(config)
        self.suffix = key_suffix(config)
        self.page_nbytes = config.page_nbytes
        self.stats = {"pages_written": 0, "pages_read": 0, "corrupt_pages": 0}

    @classmethod
    def open(cls, config: HiCacheStorageConfig) -> "HiCacheMooncake | None":
        opts = {**DEFAULTS, **config.extra_config}
        try:
            from mooncake.store import MooncakeDistributedStore
        except (ImportError, OSError) as e:  # OSError: a shared library it links is missing
            logger.warning("HiCache mooncake storage unavailable (%s): running without a "
                           "storage tier", e)
            return None
        store = MooncakeDistributedStore()
        rc = store.setup(opts["local_hostname"], opts["metadata_server"],
                         int(opts["global_segment_size"]), int(opts["local_buffer_size"]),
                         opts["protocol"], opts["device_name"], opts["master_server_address"])
        if rc != 0:
            logger.warning("HiCache mooncake store at %s did not set up (code %s): running "
                           "without a storage tier", opts["master_server_address"], rc)
            return None
        logger.info("HiCache mooncake storage, master %s", opts["master_server_address"])
        return cls(config, store)

    def _key(self, key: str) -> str:
        return key + self.suffix

    def exists(self, key: str) -> bool:
        return self.store.is_exist(self._key(key)) == 1

    def batch_exists(self, keys: list[str]) -> int:
        found = self.store.batch_is_exist([self._key(k) for k in keys])
        for i, hit in enumerate(found):
            if hit != 1:
                return i
        return len(keys)

    def set(self, key: str, value: torch.Tensor | None = None,
            target_location: Any = None, target_sizes: Any = None) -> bool:
        if value is None:
            return False
        page = encode_page(value.contiguous().view(torch.uint8).numpy().tobytes(),
                           self.layout_digest)
        ok = self.store.put(self._key(key), page) == 0
        self.stats["pages_written"] += ok
        return ok

    def get(self, key: str, target_location: torch.Tensor | None = None,
            target_sizes: Any = None) -> torch.Tensor | None:
        raw = self.store.get(self._key(key))
        if not raw:
            return None
        payload = decode_page(bytes(raw), self.layout_digest, self.page_nbytes)
        if payload is None:
            self.stats["corrupt_pages"] += 1
            self.store.remove(self._key(key))
            return None
        self.stats["pages_read"] += 1
        return page_tensor(payload, target_location)

    def get_stats(self) -> dict[str, Any]:
        return dict(self.stats)

    def close(self) -> None:
        self.store.close()
