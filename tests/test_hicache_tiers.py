"""HiCache's parts, without a model: the copies between device and host pools against
a plain indexed copy, the per-layer load, the page keys, and the order in which pages
leave the tiers (device → host → storage → gone) and come back."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest
import torch

from radixserve.configs.hicache_config import HiCacheConfig
from radixserve.mem_cache.allocator import TokenToKVPoolAllocator
from radixserve.mem_cache.hicache import HiRadixCache
from radixserve.mem_cache.hicache.host_pool import HostKVPool, device_kv_buffers
from radixserve.mem_cache.hicache.page_hash import page_hashes
from radixserve.mem_cache.hicache.transfer import KVTransfer, host_runs, reference_copy
from radixserve.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool, ReqToTokenPool
from radixserve.server_args import ServerArgs

LAYERS = 3


def _pools(kind: str, slots: int) -> MHATokenToKVPool | MLATokenToKVPool:
    if kind == "mha":
        return MHATokenToKVPool(slots, torch.float32, 3, 5, LAYERS, "cpu", v_head_dim=7)
    return MLATokenToKVPool(slots, torch.float32, 6, 3, LAYERS, "cpu")


def _randomize(pool) -> None:
    g = torch.Generator().manual_seed(0)
    for bufs in device_kv_buffers(pool):
        for b in bufs:
            b.copy_(torch.randn(b.shape, generator=g))


@pytest.mark.parametrize("kind", ["mha", "mla"])
@pytest.mark.parametrize("io_backend", ["kernel", "direct"])
@pytest.mark.parametrize("page_size", [1, 3])
def test_copies_match_the_reference(kind, io_backend, page_size):
    pool = _pools(kind, 40)
    _randomize(pool)
    host = HostKVPool(pool, 11 * page_size, page_size)
    transfer = KVTransfer(device_kv_buffers(pool), host.buffers, io_backend, page_size)
    pages = [7, 8, 2, 9, 0]  # two runs of consecutive host rows, one single page
    host_idx = host.slots(pages)
    dev_idx = torch.randperm(39)[:len(host_idx)] + 1
    transfer.to_host(dev_idx, host_idx)
    for dev_layers, hbuf in zip(device_kv_buffers(pool), host.buffers):
        for layer, dev in enumerate(dev_layers):
            expected = torch.zeros_like(hbuf[layer])
            reference_copy(expected, host_idx, dev, dev_idx)
            assert torch.equal(hbuf[layer][host_idx], expected[host_idx])
    # Back to other device rows, layer by layer.
    before = [[dev.clone() for dev in layers] for layers in device_kv_buffers(pool)]
    back = torch.randperm(39)[:len(host_idx)] + 1
    load = transfer.start_load(host_idx, back)
    for layer in range(LAYERS):
        load.wait(layer)
    for dev_layers, old, hbuf in zip(device_kv_buffers(pool), before, host.buffers):
        for layer, dev in enumerate(dev_layers):
            expected = old[layer].clone()
            reference_copy(expected, back, hbuf[layer], host_idx)
            assert torch.equal(dev, expected)
            assert torch.equal(dev[back], old[layer][dev_idx])  # the round trip


def test_host_runs():
    assert host_runs([4, 5, 6, 0, 1, 9]) == [(0, 4, 3), (3, 0, 2), (5, 9, 1)]
    assert host_runs([]) == []


def test_a_host_pool_larger_than_free_memory_is_refused(monkeypatch):
    import radixserve.mem_cache.hicache.host_pool as hp

    monkeypatch.setattr(hp, "host_memory_available", lambda: 1 << 20)
    with pytest.raises(ValueError, match="free host memory"):
        HostKVPool(_pools("mha", 8), 1 << 16, 1)


def test_page_round_trip_through_bytes():
    pool = _pools("mha", 12)
    _randomize(pool)
    host = HostKVPool(pool, 8, 2)
    KVTransfer(device_kv_buffers(pool), host.buffers, "kernel", 2).to_host(
        torch.tensor([3, 4]), host.slots([1]))
    data = host.read_page(1)
    assert data.dtype == torch.uint8 and data.numel() == host.page_nbytes()
    host.write_page(3, data)
    for b in host.buffers:
        assert torch.equal(b[:, 6:8], b[:, 2:4])


def test_page_keys_name_the_whole_prefix():
    a = page_hashes([1, 2, 3, 4, 5], 2)
    assert len(a) == 2  # whole pages only
    assert page_hashes([1, 2, 3, 4], 2) == a
    assert page_hashes([9, 2, 3, 4], 2)[1] != a[1]  # same page, other prefix
    assert page_hashes([1, 2, 3, 4], 1)[1] != a[0]  # the page size is part of the key
    assert page_hashes([1, 2, 3, 4, 5, 6], 2, first_page=1) == page_hashes(
        [1, 2, 3, 4, 5, 6], 2)[1:]


# --- the tiers ---------------------------------------------------------------------

PS = 2


def _kv_value(tokens: list[int], layer: int) -> torch.Tensor:
    """K rows a model would have written for tokens (a function of the prefix)."""
    pos = torch.arange(len(tokens), dtype=torch.float32)
    ids = torch.tensor(tokens, dtype=torch.float32)
    return (torch.cumsum(ids, 0) + 1000 * layer + pos / 7)[:, None, None].expand(-1, 3, 5)


def _cache(tmp_path, policy="write_back", host_pages=6, storage=True) -> HiRadixCache:
    pool = MHATokenToKVPool(16 + PS - 1, torch.float32, 3, 5, LAYERS, "cpu")
    allocator = TokenToKVPoolAllocator(16, PS, "cpu")
    extra = {"file_path": str(tmp_path)} if storage else {}
    cfg = HiCacheConfig(enable=True, ratio=host_pages * PS / 16, write_policy=policy,
                        storage_backend="file" if storage else None, extra_config=extra,
                        model_name="tiny")
    return HiRadixCache(ReqToTokenPool(4, 64, "cpu"), allocator, PS, pool, cfg)


def _prefill(cache: HiRadixCache, tokens: list[int]) -> None:
    """What a request's prefill does: slots, KV written by the forward, then insert."""
    slots = cache.token_to_kv_pool_allocator.alloc(len(tokens))
    assert slots is not None
    for layer in range(LAYERS):
        cache.device_pool.k_buffer[layer][slots] = _kv_value(tokens, layer)
    assert cache.insert(tokens, slots) == 0


def _device_match(cache: HiRadixCache, tokens: list[int]) -> int:
    return len(cache.match_prefix(tokens).device_indices)


def _load(cache: HiRadixCache, tokens: list[int]) -> SimpleNamespace:
    match = cache.match_prefix(tokens)
    req = SimpleNamespace(fill_ids=tokens + [0], prefix_indices=match.device_indices,
                          last_node=match.last_node, key_ids=lambda ids: ids)  # text only
    cache.load_back(req)
    return req


def _assert_device_kv(cache: HiRadixCache, tokens: list[int], slots: torch.Tensor) -> None:
    for layer in range(LAYERS):
        got = cache.device_pool.k_buffer[layer][slots]
        assert torch.equal(got, _kv_value(tokens, layer)[:len(slots)])


def test_eviction_goes_device_host_storage_gone(tmp_path):
    A, B, C = list(range(10, 18)), list(range(30, 38)), list(range(50, 58))
    cache = _cache(tmp_path)
    _prefill(cache, A)
    _prefill(cache, B)
    assert cache.host_cached_pages() == 0  # write_back: nothing copied yet
    cache.evict(8)  # A is the least recently used
    assert _device_match(cache, A) == 0 and _device_match(cache, B) == 8
    keys_a = page_hashes(A, PS)
    assert all(k in cache.host_index for k in keys_a)
    assert len(list(tmp_path.iterdir())) == 4  # the storage tier is written through
    _prefill(cache, C)
    cache.evict(8)  # B goes to the host, which makes room by dropping A's deepest pages
    assert all(k in cache.host_index for k in page_hashes(B, PS))
    assert [k in cache.host_index for k in keys_a] == [True, True, False, False]
    # A comes back: two pages from the host, two from storage.
    req = _load(cache, A)
    assert cache.stats.host_hit_tokens == 4 and cache.stats.storage_hit_tokens == 4
    assert len(req.prefix_indices) == 8 and _device_match(cache, A) == 8
    cache._finish_loads()
    _assert_device_kv(cache, A, req.prefix_indices)


def test_without_storage_dropped_pages_are_gone(tmp_path):
    A, B, C = list(range(10, 18)), list(range(30, 38)), list(range(50, 58))
    cache = _cache(tmp_path, storage=False)
    for seq in (A, B):
        _prefill(cache, seq)
    cache.evict(8)
    _prefill(cache, C)
    cache.evict(16)
    # Six host pages for twelve: A went first, then B's last two pages (a prefix is
    # trimmed from its end, so what is left of it still matches).
    assert len(_load(cache, A).prefix_indices) == 0
    req_b = _load(cache, B)
    assert len(req_b.prefix_indices) == 4
    req_c = _load(cache, C)
    assert len(req_c.prefix_indices) == 8
    cache._finish_loads()
    _assert_device_kv(cache, B, req_b.prefix_indices)
    _assert_device_kv(cache, C, req_c.prefix_indices)


def test_load_runs_layer_by_layer_at_the_forward(tmp_path):
    A = list(range(10, 18))
    cache = _cache(tmp_path, storage=False)
    _prefill(cache, A)
    cache.evict(8)
    req = _load(cache, A)
    slots = req.prefix_indices
    pool = cache.device_pool
    assert pool.layer_ready is not None  # the next forward's attention layers call it

    def landed(layer: int) -> bool:
        return torch.equal(pool.k_buffer[layer][slots], _kv_value(A, layer))

    assert not any(landed(i) for i in range(LAYERS))
    pool.layer_ready(0)  # layer 0 has landed; layer 1 is on its way (issued ahead)
    assert landed(0) and not landed(2)
    for layer in range(1, LAYERS):
        pool.layer_ready(layer)
    assert all(landed(i) for i in range(LAYERS))
    assert pool.layer_ready is None and cache.host_locked_pages() == 0


def test_a_load_left_by_a_failed_admission_is_issued_when_a_request_finishes(tmp_path):
    A = list(range(10, 18))
    cache = _cache(tmp_path, storage=False)
    _prefill(cache, A)
    cache.evict(8)
    req = _load(cache, A)  # ... and then the request was not admitted
    assert cache.loads_pending() and cache.host_locked_pages() == 4
    done = SimpleNamespace(req_pool_idx=None, last_node=None, prefix_indices=None)
    cache.cache_finished_req(done)  # another request finishes
    assert not cache.loads_pending() and cache.host_locked_pages() == 0
    _assert_device_kv(cache, A, req.prefix_indices)


def test_write_through_copies_at_insert_and_selective_only_hot_nodes(tmp_path):
    A, B = list(range(10, 18)), list(range(30, 38))
    through = _cache(tmp_path, policy="write_through", storage=False)
    _prefill(through, A)
    assert through.host_cached_pages() == 4
    selective = _cache(tmp_path, policy="write_through_selective", storage=False)
    _prefill(selective, A)
    _prefill(selective, B)
    assert _device_match(selective, B + [0]) == 8  # B is hit once, A never
    selective.evict(16)
    assert all(k in selective.host_index for k in page_hashes(B, PS))
    assert not any(k in selective.host_index for k in page_hashes(A, PS))


def test_a_load_never_evicts_the_prefix_it_extends(tmp_path):
    A, B, D = list(range(10, 18)), list(range(30, 38)), list(range(50, 58))
    cache = _cache(tmp_path, host_pages=8, storage=False)
    _prefill(cache, A + B)
    cache.evict(16)  # all of it to the host
    req = _load(cache, A)  # A back on the device, B still on the host
    cache._finish_loads()
    _prefill(cache, D)
    cache.inc_lock_ref(cache.match_prefix(D).last_node)  # D belongs to a running request
    # Loading B needs room, and the only unlocked device KV is A, the prefix B extends.
    req = _load(cache, A + B)
    assert len(req.prefix_indices) == 8  # no room: B is computed, A stays
    cache._finish_loads()
    _assert_device_kv(cache, A, req.prefix_indices)
    assert cache.host_locked_pages() == 0


# --- flags --------------------------------------------------------------------------

def _parse(*argv: str) -> ServerArgs:
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    return ServerArgs.from_cli_args(parser.parse_args(["--model-path", "x", *argv]), parser)


def test_flags_follow_sglang():
    sa = _parse("--enable-hierarchical-cache", "--hicache-ratio", "3",
                "--hicache-write-policy", "write_back", "--hicache-io-backend", "direct",
                "--hicache-storage-backend", "file", "--hicache-storage-prefetch-policy",
                "wait_complete", "--hicache-storage-backend-extra-config",
                '{"file_path": "/tmp/x"}')
    cfg = sa.hicache_config()
    assert (cfg.enable, cfg.ratio, cfg.write_policy, cfg.io_backend, cfg.storage_backend,
            cfg.prefetch_policy, cfg.extra_config) == (
        True, 3.0, "write_back", "direct", "file", "wait_complete", {"file_path": "/tmp/x"})
    default = _parse().hicache_config()
    assert (default.enable, default.ratio, default.size_gb, default.write_policy,
            default.io_backend, default.storage_backend, default.prefetch_policy) == (
        False, 2.0, 0, "write_through", "kernel", None, "best_effort")


@pytest.mark.parametrize("argv, words", [
    (["--hicache-write-policy", "sometimes"], "hicache-write-policy"),
    (["--hicache-ratio", "0"], "hicache-ratio"),
    (["--enable-hierarchical-cache", "--disable-radix-cache"], "mutually exclusive"),
    (["--enable-hierarchical-cache", "--hicache-storage-backend-extra-config", "{x"],
     "not JSON"),
    (["--hicache-storage-backend", "file"], "needs enable_hierarchical_cache"),
])
def test_bad_flags_are_one_line_argparse_errors(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        _parse(*argv)
    assert e.value.code == 2
    assert words in capsys.readouterr().err


def test_bad_combination_is_a_value_error_offline():
    with pytest.raises(ValueError, match="mutually exclusive"):
        ServerArgs(model_path="x", enable_hierarchical_cache=True, disable_radix_cache=True)
