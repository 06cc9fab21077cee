"""The host KV pool: the device pool's rows, per layer, in host memory (pinned when the
device pool is on CUDA, so copies to and from it run asynchronously).

It is paged like the device pool (the same page_size), and a host page holds one
device page's tokens for every layer. Layout is layer-first, as SGLang's default:
component c (K and V for MHA, the one latent row for MLA) is a tensor
[num_layers, num_pages * page_size, *row_shape].
"""

from __future__ import annotations

import os

import torch

from radixserve.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool

DevicePool = MHATokenToKVPool | MLATokenToKVPool

# The most of the free host memory the pool may take: the rest is for the process.
_HOST_MEMORY_SHARE = 0.9


def host_memory_available() -> int:
    """Bytes of host memory that can be had now (MemAvailable counts the page cache the
    kernel would give back; free pages alone would refuse pools that fit)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def device_kv_buffers(pool: DevicePool) -> list[list[torch.Tensor]]:
    """The pool's buffers by component, then layer: [[k per layer], [v per layer]] (MHA)
    or [[kv per layer]] (MLA)."""
    if isinstance(pool, MLATokenToKVPool):
        return [pool.kv_buffer]
    return [pool.k_buffer, pool.v_buffer]


def bytes_per_token(pool: DevicePool) -> int:
    return sum(bufs[0][0].numel() * bufs[0].element_size() * len(bufs)
               for bufs in device_kv_buffers(pool))


class HostKVPool:
    def __init__(self, device_pool: DevicePool, num_tokens: int, page_size: int) -> None:
        self.page_size = page_size
        self.num_pages = num_tokens // page_size
        if self.num_pages < 1:
            raise ValueError(f"host KV pool of {num_tokens} tokens is smaller than one page "
                             f"({page_size})")
        self.size = self.num_pages * page_size
        pin = torch.device(device_pool.device).type == "cuda"
        self.layout = "mla" if isinstance(device_pool, MLATokenToKVPool) else "mha"
        need = self.size * bytes_per_token(device_pool)
        free = host_memory_available()
        if need > free * _HOST_MEMORY_SHARE:
            raise ValueError(
                f"host KV pool of {need / 2**30:.1f} GiB does not fit in the "
                f"{free / 2**30:.1f} GiB of free host memory; lower --hicache-ratio or set "
                f"--hicache-size (GB)")
        # Left uninitialised: a host row is read only after a backup or a storage read
        # wrote it, and zeroing a pool of this size costs seconds at startup.
        self.buffers = [
            torch.empty((len(bufs), self.size, *bufs[0].shape[1:]), dtype=bufs[0].dtype,
                        pin_memory=pin)
            for bufs in device_kv_buffers(device_pool)]
        self.free_pages: list[int] = list(range(self.num_pages - 1, -1, -1))

    def available_pages(self) -> int:
        return len(self.free_pages)

    def alloc_pages(self, n: int) -> list[int] | None:
        """n pages, in ascending order where the free list allows (fewer copies)."""
        if n > len(self.free_pages):
            return None
        pages = self.free_pages[-n:] if n else []
        del self.free_pages[len(self.free_pages) - n:]
        return pages[::-1]

    def free_page(self, page: int) -> None:
        self.free_pages.append(page)

    def clear(self) -> None:
        self.free_pages = list(range(self.num_pages - 1, -1, -1))

    def slots(self, pages: list[int]) -> torch.Tensor:
        """Host rows of `pages`, in order."""
        ps = self.page_size
        base = torch.tensor(pages, dtype=torch.int64).repeat_interleave(ps) * ps
        return base + torch.arange(ps, dtype=torch.int64).repeat(len(pages))

    # --- one page as bytes (the storage tier's value) -------------------------------

    def page_nbytes(self) -> int:
        return sum(b[:, :self.page_size].numel() * b.element_size() for b in self.buffers)

    def read_page(self, page: int) -> torch.Tensor:
        """The page's rows of every component and layer, as one uint8 tensor."""
        rows = slice(page * self.page_size, (page + 1) * self.page_size)
        return torch.cat([b[:, rows].contiguous().view(torch.uint8).reshape(-1)
                          for b in self.buffers])

    def write_page(self, page: int, data: torch.Tensor) -> None:
        """Inverse of read_page."""
        rows = slice(page * self.page_size, (page + 1) * self.page_size)
        offset = 0
        for b in self.buffers:
            part = b[:, rows]
            n = part.numel() * b.element_size()
            part.copy_(data[offset:offset + n].view(b.dtype).view(part.shape))
            offset += n
