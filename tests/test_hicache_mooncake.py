"""The mooncake storage backend against a real Mooncake store over loopback (TCP).

Skipped unless mooncake-transfer-engine imports (it is optional, and needs libibverbs1
and librdmacm1 even for TCP). To run it here:
    pip install --target /tmp/mc --no-deps mooncake-transfer-engine-non-cuda
    apt-get install -y libibverbs1 librdmacm1
    PYTHONPATH=/tmp/mc python -m pytest -q tests/test_hicache_mooncake.py
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import time

import pytest
import torch

from radixserve.configs.hicache_config import HiCacheConfig
from radixserve.mem_cache.allocator import TokenToKVPoolAllocator
from radixserve.mem_cache.hicache import HiRadixCache
from radixserve.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from tests.test_hicache_tiers import LAYERS, PS, _assert_device_kv, _load, _prefill


def _mooncake_dir() -> str | None:
    try:
        spec = importlib.util.find_spec("mooncake.store")
    except (ImportError, OSError):
        return None
    if spec is None:
        return None
    try:
        import mooncake.store  # noqa: F401
    except (ImportError, OSError):
        return None
    return os.path.dirname(spec.origin)


pytestmark = pytest.mark.skipif(_mooncake_dir() is None,
                                reason="mooncake-transfer-engine is not importable")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def master():
    rpc, http = _port(), _port()
    proc = subprocess.Popen(
        [os.path.join(_mooncake_dir(), "mooncake_master"), f"--rpc_port={rpc}",
         "--enable_http_metadata_server=true", f"--http_metadata_server_port={http}",
         "--http_metadata_server_host=127.0.0.1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(3)
    assert proc.poll() is None, "mooncake_master did not start"
    yield {"master_server_address": f"127.0.0.1:{rpc}",
           "metadata_server": f"http://127.0.0.1:{http}/metadata", "protocol": "tcp",
           "global_segment_size": 64 << 20, "local_buffer_size": 16 << 20}
    proc.terminate()
    proc.wait(10)


def _cache(extra: dict) -> HiRadixCache:
    pool = MHATokenToKVPool(16 + PS - 1, torch.float32, 3, 5, LAYERS, "cpu")
    cfg = HiCacheConfig(enable=True, ratio=1.0, write_policy="write_through",
                        storage_backend="mooncake", extra_config=extra, model_name="tiny")
    return HiRadixCache(ReqToTokenPool(4, 64, "cpu"), TokenToKVPoolAllocator(16, PS, "cpu"),
                        PS, pool, cfg)


def test_a_second_cache_finds_the_pages_in_the_store(master):
    A = list(range(10, 26))
    first = _cache(master)
    assert first.storage is not None
    _prefill(first, A)  # write_through: host, and from there the store
    assert first.storage.batch_exists([k for k in _keys(A)]) == len(A) // PS
    second = _cache(master)  # another server (or this one restarted)
    req = _load(second, A)
    assert len(req.prefix_indices) == len(A)
    assert second.stats.storage_hit_tokens == len(A)
    second._finish_loads()
    _assert_device_kv(second, A, req.prefix_indices)


def _keys(tokens: list[int]) -> list[str]:
    from radixserve.mem_cache.hicache.page_hash import page_hashes

    return page_hashes(tokens, PS)
