"""HiCache end to end on CPU: a device KV pool too small for a multi-turn workload, a
host pool ten times larger, and the file storage tier.

Every configuration must give the greedy tokens of the same run with HiCache off, serve
revisited prefixes from the host (or storage) instead of recomputing them, and leave
every tier idle afterwards. Batched rounds, chunked and mixed prefills and aborts are in
test_hicache_scheduling.py; the tier primitives (eviction order, the per-layer load,
the copies, the file format) in test_hicache_tiers.py.
"""

from __future__ import annotations

import logging
import os
import random

import pytest

from radixserve.engine import Engine
from tests.model_factory import make_tiny_checkpoint

DEVICE_TOKENS = 256
GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
CONVERSATIONS, ROUNDS, FIRST_LEN, TURN_LEN = 4, 4, 40, 16


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return str(make_tiny_checkpoint("qwen3", tmp_path_factory.mktemp("qwen3")))


def multi_turn(eng: Engine, seed: int = 0) -> tuple[list[list[int]], int]:
    """Conversations taking turns, one request at a time, each round appending a user
    turn to its history (the history of all of them outgrows the device pool). Returns
    the outputs and the fewest prefill tokens that could serve them (each computed once)."""
    rng = random.Random(seed)
    history = [[rng.randrange(3, 40000) for _ in range(FIRST_LEN)]
               for _ in range(CONVERSATIONS)]
    computed = [0] * CONVERSATIONS  # tokens of each history whose KV exists somewhere
    outs, minimum = [], 0
    for _ in range(ROUNDS):
        for c in range(CONVERSATIONS):
            prompt = history[c] + [rng.randrange(3, 40000) for _ in range(TURN_LEN)]
            out = eng.generate(input_ids=prompt, sampling_params=GREEDY)["output_ids"]
            outs.append(out)
            minimum += len(prompt) - computed[c]
            history[c] = prompt + out
            computed[c] = len(history[c]) - 1  # the last sampled token was never fed
    return outs, minimum


def assert_idle(eng: Engine) -> None:
    """No request holds anything, on any tier; then a flush frees every tier."""
    info = eng.get_server_info()
    assert info.num_running_reqs == 0 and info.num_waiting_reqs == 0
    assert info.protected_tokens == 0
    assert info.available_tokens + info.evictable_tokens == info.max_total_num_tokens
    cache = eng.scheduler.kv.tree_cache
    assert cache.host_locked_pages() == 0 and not cache.loads_pending()
    host = cache.host_pool
    assert host.available_pages() + cache.host_cached_pages() == host.num_pages
    assert eng.flush_cache()
    info = eng.get_server_info()
    assert info.available_tokens == info.max_total_num_tokens
    assert host.available_pages() == host.num_pages


@pytest.fixture(scope="module")
def reference(model_path):
    eng = Engine(model_path=model_path, max_total_tokens=DEVICE_TOKENS)
    outs, _ = multi_turn(eng)
    prefill = eng.get_server_info().total_prefill_tokens
    eng.shutdown()
    return outs, prefill


@pytest.mark.parametrize("kwargs", [
    {},
    {"hicache_write_policy": "write_back"},
    {"hicache_write_policy": "write_through_selective"},
    {"hicache_io_backend": "direct", "page_size": 4},
    {"enable_cpu_overlap": True, "page_size": 2},
], ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "write_through")
def test_multi_turn_same_tokens_served_from_host(model_path, reference, kwargs):
    expected, radix_prefill = reference
    eng = Engine(model_path=model_path, max_total_tokens=DEVICE_TOKENS,
                 enable_hierarchical_cache=True, hicache_ratio=10, **kwargs)
    outs, minimum = multi_turn(eng)
    assert outs == expected
    stats = eng.get_server_info().extra["hicache"]  # what /get_server_info reports
    assert stats["host_hit_tokens"] > 0 and stats["bytes_host_to_device"] > 0
    assert stats["bytes_device_to_host"] > 0
    prefill = eng.get_server_info().total_prefill_tokens
    assert prefill < radix_prefill
    if kwargs.get("page_size", 1) == 1 and "hicache_write_policy" not in kwargs:
        # Every token computed once (the selective policy drops cold pages by design).
        assert minimum <= prefill <= 1.1 * minimum
    assert_idle(eng)
    eng.shutdown()


def _storage_engine(model_path: str, path: str) -> Engine:
    return Engine(model_path=model_path, max_total_tokens=DEVICE_TOKENS, page_size=4,
                  enable_hierarchical_cache=True, hicache_ratio=4,
                  hicache_storage_backend="file",
                  hicache_storage_backend_extra_config=f'{{"file_path": "{path}"}}')


def test_file_backend_serves_a_restarted_server(model_path, tmp_path):
    rng = random.Random(7)
    prefix = [rng.randrange(3, 40000) for _ in range(200)]
    prompt = prefix + [9, 10, 11]
    first = _storage_engine(model_path, str(tmp_path))
    expected = first.generate(input_ids=prompt, sampling_params=GREEDY)
    assert expected["meta_info"]["cached_tokens"] == 0
    first.shutdown()
    assert len(os.listdir(tmp_path)) >= len(prefix) // 4
    second = _storage_engine(model_path, str(tmp_path))
    again = second.generate(input_ids=prompt, sampling_params=GREEDY)
    assert again["output_ids"] == expected["output_ids"]
    assert again["meta_info"]["cached_tokens"] > 0.9 * len(prefix)
    assert second.scheduler.kv.tree_cache.stats.storage_hit_tokens > 0.9 * len(prefix)
    assert_idle(second)
    second.shutdown()


def test_corrupt_and_truncated_pages_are_recomputed(model_path, tmp_path, caplog):
    rng = random.Random(8)
    prompt = [rng.randrange(3, 40000) for _ in range(160)] + [9]
    first = _storage_engine(model_path, str(tmp_path))
    expected = first.generate(input_ids=prompt, sampling_params=GREEDY)["output_ids"]
    first.shutdown()
    files = sorted(os.listdir(tmp_path))
    # Damage two pages of the prompt: one flipped byte, one cut short. Which page a
    # file holds does not matter: any damaged page on the path cuts the match there.
    with open(tmp_path / files[0], "r+b") as f:
        f.seek(-3, os.SEEK_END)
        byte = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    with open(tmp_path / files[1], "r+b") as f:
        f.truncate(os.path.getsize(tmp_path / files[1]) // 2)
    second = _storage_engine(model_path, str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="radixserve.mem_cache.hicache.file_storage"):
        out = second.generate(input_ids=prompt, sampling_params=GREEDY)
    assert out["output_ids"] == expected
    storage = second.scheduler.kv.tree_cache.storage
    assert storage.get_stats()["corrupt_pages"] >= 1
    assert "corrupt or truncated" in caplog.text
    assert out["meta_info"]["cached_tokens"] < len(prompt) - 1
    assert_idle(second)
    second.shutdown()


def test_unwritable_path_runs_without_storage(model_path, tmp_path, caplog):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with caplog.at_level(logging.WARNING, logger="radixserve.mem_cache.hicache.file_storage"):
        eng = _storage_engine(model_path, str(not_a_dir / "sub"))
    assert eng.scheduler.kv.tree_cache.storage is None
    assert "not writable" in caplog.text
    prompt = list(range(100, 160))
    assert len(eng.generate(input_ids=prompt, sampling_params=GREEDY)["output_ids"]) == 8
    eng.shutdown()


def test_full_disk_turns_the_storage_tier_off(model_path, tmp_path, caplog, monkeypatch):
    import radixserve.mem_cache.hicache.file_storage as fs

    eng = _storage_engine(model_path, str(tmp_path))
    real_replace = os.replace

    def no_space(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fs.os, "replace", no_space)
    with caplog.at_level(logging.WARNING, logger="radixserve.mem_cache.hicache.file_storage"):
        out = eng.generate(input_ids=list(range(200, 300)), sampling_params=GREEDY)
    monkeypatch.setattr(fs.os, "replace", real_replace)
    assert len(out["output_ids"]) == 8
    assert "storage tier off" in caplog.text
    assert eng.scheduler.kv.tree_cache.storage.enabled is False
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert_idle(eng)
    eng.shutdown()
