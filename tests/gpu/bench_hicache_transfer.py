"""Load-back bandwidth of HiCache's host → device copy against a plain pinned copy of
the same bytes, on a Qwen3-8B-shaped KV pool (36 layers, 8 KV heads of 128, bf16).

    python tests/gpu/bench_hicache_transfer.py [--tokens 65536] [--page-size 64]

Prints GB/s for: one contiguous pinned → device copy (the ceiling), the layer-wise
load (kernel and direct io backends), and the device → host backup.
"""

from __future__ import annotations

import argparse
import random

import torch

from radixserve.mem_cache.hicache.host_pool import HostKVPool, device_kv_buffers
from radixserve.mem_cache.hicache.transfer import KVTransfer
from radixserve.mem_cache.memory_pool import MHATokenToKVPool


def _time(fn, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--page-size", type=int, default=64)
    args = parser.parse_args()
    ps, n = args.page_size, args.tokens
    pool = MHATokenToKVPool(2 * n + ps, torch.bfloat16, 8, 128, 36, "cuda")
    host = HostKVPool(pool, 2 * n, ps)
    nbytes = n * sum(b[0][0].numel() * b[0].element_size() * len(b)
                     for b in device_kv_buffers(pool))
    flat = torch.empty(nbytes // 2, dtype=torch.bfloat16, pin_memory=True)
    dev_flat = torch.empty_like(flat, device="cuda")
    ceiling = nbytes / _time(lambda: dev_flat.copy_(flat, non_blocking=True)) / 1e9
    print(f"pinned -> device, one copy: {ceiling:.1f} GB/s ({nbytes / 2**30:.2f} GiB)")
    dev_pages = torch.tensor(random.Random(1).sample(range(1, 2 * n // ps), n // ps))
    dev_idx = (dev_pages[:, None] * ps + torch.arange(ps)).reshape(-1)
    layouts = {"host pages in one run": list(range(n // ps)),
               "host pages scattered": random.Random(0).sample(range(host.num_pages), n // ps)}
    for name, pages in layouts.items():
        host_idx = host.slots(pages)
        for io in ("kernel", "direct"):
            t = KVTransfer(device_kv_buffers(pool), host.buffers, io, ps)
            load = _time(lambda: t.start_load(host_idx, dev_idx).finish())
            back = _time(lambda: t.to_host(dev_idx, host_idx))
            print(f"{name}, {io}: load-back {nbytes / load / 1e9:.1f} GB/s "
                  f"({100 * nbytes / load / 1e9 / ceiling:.0f}% of the pinned copy), "
                  f"backup {nbytes / back / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
