"""The `file` storage backend: one file per page, named by the page's key.

A file is one framed page (page_codec.py): a truncated or corrupted page, or one
written for another layout, is a miss (and is deleted), never served. Files are written
to a temporary name and renamed, so a reader (this server or another one on a shared
path) never sees half a page.

The directory is `file_path` in --hicache-storage-backend-extra-config, /tmp/hicache
by default (SGLang's). If it cannot be created or written, or the disk fills up, the
tier turns itself off with a log line and the cache runs on device and host only.
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any

import torch

from radixserve.mem_cache.hicache.page_codec import decode_page, encode_page, page_tensor
from radixserve.mem_cache.hicache.storage import (HiCacheStorage, HiCacheStorageConfig,
                                                  key_suffix, layout_digest)

logger = logging.getLogger(__name__)

DEFAULT_DIR = "/tmp/hicache"


class HiCacheFile(HiCacheStorage):
    def __init__(self, config: HiCacheStorageConfig, file_path: str) -> None:
        self.file_path = file_path
        self.layout_digest = layout_digest(config)
        self.suffix = key_suffix(config)
        self.page_nbytes = config.page_nbytes
        self.enabled = True
        self.stats = {"pages_written": 0, "pages_read": 0, "corrupt_pages": 0}

    @classmethod
    def open(cls, config: HiCacheStorageConfig) -> "HiCacheFile | None":
        path = str(config.extra_config.get("file_path", DEFAULT_DIR))
        try:
            os.makedirs(path, exist_ok=True)
            probe = os.path.join(path, f".probe-{uuid.uuid4().hex}")
            with open(probe, "wb") as f:
                f.write(b"x")
            os.remove(probe)
        except OSError as e:
            logger.warning("HiCache file storage at %s is not writable (%s): running "
                           "without a storage tier", path, e)
            return None
        logger.info("HiCache file storage at %s", path)
        return cls(config, path)

    def _path(self, key: str) -> str:
        return os.path.join(self.file_path, f"{key}{self.suffix}.bin")

    def exists(self, key: str) -> bool:
        return self.enabled and os.path.exists(self._path(key))

    def set(self, key: str, value: torch.Tensor | None = None,
            target_location: Any = None, target_sizes: Any = None) -> bool:
        if not self.enabled or value is None:
            return False
        page = encode_page(value.contiguous().view(torch.uint8).numpy().tobytes(),
                           self.layout_digest)
        path = self._path(key)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(page)
            os.replace(tmp, path)
        except OSError as e:
            self._remove(tmp)
            # A full disk or a path gone read-only: stop using the tier rather than fail
            # (or retry) every write.
            logger.warning("HiCache file storage write failed (%s): storage tier off", e)
            self.enabled = False
            return False
        self.stats["pages_written"] += 1
        return True

    def get(self, key: str, target_location: torch.Tensor | None = None,
            target_sizes: Any = None) -> torch.Tensor | None:
        if not self.enabled:
            return None
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError:
            return None
        payload = decode_page(raw, self.layout_digest, self.page_nbytes)
        if payload is None:
            logger.warning("HiCache: page %s on disk is corrupt or truncated; recomputing it",
                           key)
            self.stats["corrupt_pages"] += 1
            self._remove(path)
            return None
        self.stats["pages_read"] += 1
        return page_tensor(payload, target_location)

    @staticmethod
    def _remove(path: str) -> None:
        try:
            os.remove(path)
        except OSError:
            pass

    def clear(self) -> None:
        for name in os.listdir(self.file_path):
            if name.endswith(f"{self.suffix}.bin"):
                self._remove(os.path.join(self.file_path, name))

    def get_stats(self) -> dict[str, Any]:
        return dict(self.stats)

