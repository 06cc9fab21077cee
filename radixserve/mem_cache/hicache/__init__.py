"""HiCache: host memory and storage tiers under the radix cache (hiradix_cache.py)."""

from radixserve.mem_cache.hicache.hiradix_cache import HiCacheStats, HiRadixCache

__all__ = ["HiCacheStats", "HiRadixCache"]
