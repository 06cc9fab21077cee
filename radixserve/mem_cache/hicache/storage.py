"""The storage tier's interface, shaped like SGLang's `HiCacheStorage` so that its
backends (Mooncake store, 3FS, NIXL) fit behind it: string keys (page_hash.py), values
a page's bytes (HostKVPool.read_page), `get` / `set` / `exists` and their batch forms,
`batch_exists` counting the leading keys present.

A backend never raises for a missing or unreadable value: `get` returns None and the
page is recomputed.
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class HiCacheStorageConfig:
    """What a backend is told about the pages it stores."""

    model_name: str
    # Describes the page's bytes (dtype, layer count, row shapes, page size): a page
    # written under another layout is never read back as this one.
    layout_signature: str
    page_nbytes: int
    tp_rank: int = 0
    tp_size: int = 1
    is_mla_model: bool = False
    extra_config: dict[str, Any] = field(default_factory=dict)


class HiCacheStorage(ABC):
    @abstractmethod
    def get(self, key: str, target_location: torch.Tensor | None = None,
            target_sizes: Any = None) -> torch.Tensor | None:
        """The page stored under key (written into target_location when given)."""

    @abstractmethod
    def set(self, key: str, value: torch.Tensor | None = None,
            target_location: Any = None, target_sizes: Any = None) -> bool:
        """Store value (uint8) under key; False if it could not be written."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    def batch_get(self, keys: list[str], target_locations: list[torch.Tensor] | None = None,
                  target_sizes: Any = None) -> list[torch.Tensor | None]:
        targets = target_locations or [None] * len(keys)
        return [self.get(k, t) for k, t in zip(keys, targets)]

    def batch_set(self, keys: list[str], values: list[torch.Tensor] | None = None,
                  target_locations: Any = None, target_sizes: Any = None) -> bool:
        return all(self.set(k, v) for k, v in zip(keys, values or []))

    def batch_exists(self, keys: list[str]) -> int:
        """How many of the leading keys are stored."""
        for i, key in enumerate(keys):
            if not self.exists(key):
                return i
        return len(keys)

    def clear(self) -> None:
        """Drop every stored page."""

    def get_stats(self) -> dict[str, Any] | None:
        return None


def layout_digest(config: HiCacheStorageConfig) -> bytes:
    return hashlib.blake2b(config.layout_signature.encode(), digest_size=16).digest()


def key_suffix(config: HiCacheStorageConfig) -> str:
    """Appended to every page key: the model, the rank, and the layout, so that servers
    with other layouts (dtype, page size) sharing a store keep apart instead of refusing
    each other's pages."""
    model = re.sub(r"[^A-Za-z0-9._-]", "-", config.model_name).strip("-")[-80:]
    layout = layout_digest(config).hex()[:8]
    if config.is_mla_model:  # every rank holds the same latent rows
        return f"_{model}_{layout}"
    return f"_{model}_{config.tp_rank}_{config.tp_size}_{layout}"
