"""HiCache on CUDA: the host pool is pinned, backups run on the compute stream, the
load-back runs on its own stream a layer at a time (the forward waits per layer), and a
multi-turn workload gives the same greedy tokens as the run with HiCache off.

    python -m pytest -q tests/gpu/test_hicache_gpu.py
"""

from __future__ import annotations

import random

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

LAYERS = 6


def _pool(kind: str, slots: int):
    from radixserve.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool

    if kind == "mha":
        return MHATokenToKVPool(slots, torch.bfloat16, 8, 128, LAYERS, "cuda")
    return MLATokenToKVPool(slots, torch.bfloat16, 512, 64, LAYERS, "cuda")


@pytest.mark.parametrize("kind", ["mha", "mla"])
@pytest.mark.parametrize("io_backend", ["kernel", "direct"])
def test_layerwise_load_on_its_own_stream(kind, io_backend):
    from radixserve.mem_cache.hicache.host_pool import HostKVPool, device_kv_buffers
    from radixserve.mem_cache.hicache.transfer import KVTransfer

    ps = 16
    pool = _pool(kind, 4096 + ps - 1)
    for bufs in device_kv_buffers(pool):
        for b in bufs:
            b.normal_()
    host = HostKVPool(pool, 2048 * ps, ps)
    assert all(b.is_pinned() for b in host.buffers)
    transfer = KVTransfer(device_kv_buffers(pool), host.buffers, io_backend, ps)
    assert transfer.load_stream != torch.cuda.current_stream()
    pages = random.Random(0).sample(range(2048), 100)  # scattered host pages
    host_idx = host.slots(pages)
    src = torch.randperm(4096)[:len(host_idx)] + 1
    expected = [[b[src.cuda()].clone() for b in bufs] for bufs in device_kv_buffers(pool)]
    event = transfer.to_host(src, host_idx)
    event.synchronize()
    for exp, hbuf in zip(expected, host.buffers):
        for layer in range(LAYERS):
            assert torch.equal(hbuf[layer][host_idx], exp[layer].cpu())
    dst = torch.randperm(4096)[:len(host_idx)] + 1
    for bufs in device_kv_buffers(pool):
        for b in bufs:
            b[dst.cuda()] = 0
    # Keep the compute stream busy so that the load really runs beside it.
    x = torch.randn(4096, 4096, device="cuda")
    for _ in range(20):
        x = x @ x / 64
    load = transfer.start_load(host_idx, dst)
    sums = []
    for layer in range(LAYERS):
        load.wait(layer)
        assert load.issued == min(layer + 2, LAYERS)  # one layer issued ahead, no more
        sums.append([bufs[layer][dst.cuda()].float().sum() for bufs in device_kv_buffers(pool)])
    torch.cuda.synchronize()
    for layer in range(LAYERS):
        for c, bufs in enumerate(device_kv_buffers(pool)):
            assert torch.equal(bufs[layer][dst.cuda()], expected[c][layer])
            assert torch.equal(sums[layer][c], expected[c][layer].float().sum())


def _multi_turn(eng, seed=0, clients=6, rounds=4):
    rng = random.Random(seed)
    history = [[rng.randrange(3, 40000) for _ in range(200)] for _ in range(clients)]
    outs = []
    sp = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}
    for _ in range(rounds):
        prompts = [h + [rng.randrange(3, 40000) for _ in range(50)] for h in history]
        res = [o["output_ids"] for o in eng.generate(input_ids=prompts, sampling_params=sp)]
        outs.append(res)
        history = [p + o for p, o in zip(prompts, res)]
    return outs


@pytest.mark.parametrize("kwargs", [{}, {"hicache_write_policy": "write_back", "page_size": 16},
                                    {"hicache_io_backend": "direct", "page_size": 16}])
def test_multi_turn_same_tokens_as_without_hicache(tmp_path_factory, kwargs):
    from radixserve.engine import Engine
    from tests.model_factory import make_tiny_checkpoint

    path = str(make_tiny_checkpoint("qwen3", tmp_path_factory.mktemp("qwen3"),
                                    with_tokenizer=False))
    common = dict(model_path=path, skip_tokenizer_init=True, dtype="float32",
                  max_total_tokens=1024, mem_fraction_static=0.5, **kwargs)
    off = Engine(**common)
    expected = _multi_turn(off)
    off.shutdown()
    on = Engine(**common, enable_hierarchical_cache=True, hicache_ratio=8)
    assert _multi_turn(on) == expected
    cache = on.scheduler.kv.tree_cache
    assert cache.stats.host_hit_tokens > 0
    info = on.get_server_info()
    assert info.protected_tokens == 0 and cache.host_locked_pages() == 0
    assert on.flush_cache()
    on.shutdown()
