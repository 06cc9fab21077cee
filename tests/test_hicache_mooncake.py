"""The mooncake storage backend against a real Mooncake store over loopback (TCP).

mooncake-transfer-engine-non-cuda is in the test extra (with Debian's libibverbs1,
librdmacm1 and libnuma1, which .ci/run installs); a skip names the import error.
"""

from __future__ import annotations

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


def _import_mooncake_store() -> str:
    """The package directory of mooncake.store, or why it does not import."""
    try:
        import mooncake.store as store
    except (ImportError, OSError) as e:  # OSError: a shared library the wheel needs
        return f"mooncake-transfer-engine is not importable: {type(e).__name__}: {e}"
    return os.path.dirname(store.__file__)


_MOONCAKE = _import_mooncake_store()


def _mooncake_dir() -> str | None:
    return _MOONCAKE if os.path.isdir(_MOONCAKE) else None


pytestmark = pytest.mark.skipif(_mooncake_dir() is None, reason=_MOONCAKE)


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
