"""HiCacheConfig: the part of ServerArgs the hierarchical cache reads.

Built by `ServerArgs.hicache_config()`, which also runs the checks across flags: the
hierarchical cache sits on the radix cache, so it refuses --disable-radix-cache, and its
tree lives in rank 0's scheduler, so it refuses tensor parallelism for now (the other
ranks' KV would never be copied).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

WRITE_POLICIES = ("write_back", "write_through", "write_through_selective")
IO_BACKENDS = ("direct", "kernel")
STORAGE_BACKENDS = ("file", "mooncake")
PREFETCH_POLICIES = ("best_effort", "wait_complete", "timeout")


@dataclass(frozen=True)
class HiCacheConfig:
    enable: bool = False
    ratio: float = 2.0
    size_gb: int = 0  # above 0: overrides ratio
    write_policy: str = "write_through"
    io_backend: str = "kernel"
    storage_backend: str | None = None
    prefetch_policy: str = "best_effort"
    extra_config: dict[str, Any] = field(default_factory=dict)
    # Part of every storage key, so that two models never read each other's pages.
    model_name: str = ""

    @classmethod
    def from_flags(cls, *, enable: bool, ratio: float, size_gb: int, write_policy: str,
                   io_backend: str, storage_backend: str | None, prefetch_policy: str,
                   extra_config: str | None, disable_radix_cache: bool, tp_size: int,
                   model_name: str) -> "HiCacheConfig":
        _choice("hicache_write_policy", write_policy, WRITE_POLICIES)
        _choice("hicache_io_backend", io_backend, IO_BACKENDS)
        _choice("hicache_storage_prefetch_policy", prefetch_policy, PREFETCH_POLICIES)
        if storage_backend is not None:
            _choice("hicache_storage_backend", storage_backend, STORAGE_BACKENDS)
        if not ratio > 0:
            raise ValueError(f"hicache_ratio must be > 0, got {ratio}")
        if size_gb < 0:
            raise ValueError(f"hicache_size must be >= 0, got {size_gb}")
        extra = _parse_extra(extra_config)
        if enable and disable_radix_cache:
            raise ValueError("enable_hierarchical_cache and disable_radix_cache are mutually "
                             "exclusive: the hierarchical cache extends the radix cache")
        if enable and tp_size > 1:
            raise ValueError("enable_hierarchical_cache supports tp_size 1 only for now")
        if storage_backend is not None and not enable:
            raise ValueError("hicache_storage_backend needs enable_hierarchical_cache")
        return cls(enable=enable, ratio=ratio, size_gb=size_gb, write_policy=write_policy,
                   io_backend=io_backend, storage_backend=storage_backend,
                   prefetch_policy=prefetch_policy, extra_config=extra, model_name=model_name)


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def _parse_extra(text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"hicache_storage_backend_extra_config is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError("hicache_storage_backend_extra_config must be a JSON object")
    return value
