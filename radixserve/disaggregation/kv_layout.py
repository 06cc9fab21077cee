"""Where a request's KV lives in a pool, as (address, length) byte spans.

A transfer engine moves bytes between registered buffers by address, so both sides
describe their pool the same way: one contiguous buffer per layer and per part (K and V
for MHA, the single latent row for MLA), rows of a fixed byte stride, and a page of
`page_size` consecutive rows starting at `page * page_size`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KVBuffers:
    """The raw buffers of a KV pool: base pointer and row stride (bytes) of each."""

    ptrs: tuple[int, ...]
    row_bytes: tuple[int, ...]
    buffer_bytes: tuple[int, ...]
    page_size: int

    @classmethod
    def from_pool(cls, pool: object, page_size: int) -> KVBuffers:
        if hasattr(pool, "kv_buffer"):  # MLA: one latent + rope row per token and layer
            tensors = list(pool.kv_buffer)
        else:  # MHA: K of every layer, then V of every layer
            tensors = list(pool.k_buffer) + list(pool.v_buffer)
        for t in tensors:
            if not t.is_contiguous():
                raise ValueError("KV buffers must be contiguous to be sent by address")
        return cls(ptrs=tuple(t.data_ptr() for t in tensors),
                   row_bytes=tuple(t[0].numel() * t.element_size() for t in tensors),
                   buffer_bytes=tuple(t.numel() * t.element_size() for t in tensors),
                   page_size=page_size)

    def compatible_with(self, other: KVBuffers) -> bool:
        return self.row_bytes == other.row_bytes and self.page_size == other.page_size


def page_spans(bufs: KVBuffers, pages: list[int]) -> list[tuple[int, int]]:
    """(address, length) of every page in every buffer; runs of consecutive pages merge."""
    runs: list[tuple[int, int]] = []
    for p in sorted(pages):
        if runs and runs[-1][0] + runs[-1][1] == p:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((p, 1))
    spans = []
    for ptr, row, size in zip(bufs.ptrs, bufs.row_bytes, bufs.buffer_bytes):
        page_bytes = row * bufs.page_size
        for start, n in runs:
            off = start * page_bytes
            if start < 0 or off + n * page_bytes > size:
                raise ValueError(f"page run {start}+{n} outside the KV buffer")
            spans.append((ptr + off, n * page_bytes))
    return spans


def transfer_plan(src: KVBuffers, src_pages: list[int], dst: KVBuffers,
                  dst_pages: list[int]) -> list[tuple[int, int, int]]:
    """(src address, dst address, length) for copying src_pages[i] onto dst_pages[i]."""
    if not src.compatible_with(dst):
        raise ValueError("prefill and decode KV layouts differ (row bytes or page size)")
    if len(src_pages) != len(dst_pages):
        raise ValueError(f"{len(src_pages)} source pages for {len(dst_pages)} destination pages")
    plan = []
    for ptr_s, ptr_d, row, size_s, size_d in zip(src.ptrs, dst.ptrs, src.row_bytes,
                                                 src.buffer_bytes, dst.buffer_bytes):
        page_bytes = row * src.page_size
        for ps, pd in zip(src_pages, dst_pages):
            if (ps + 1) * page_bytes > size_s or (pd + 1) * page_bytes > size_d or min(ps, pd) < 0:
                raise ValueError(f"page {ps}->{pd} outside the KV buffer")
            plan.append((ptr_s + ps * page_bytes, ptr_d + pd * page_bytes, page_bytes))
    return plan


def copy_by_address(plan: list[tuple[int, int, int]]) -> None:
    """The in-process reference engine (CPU memory): what a transfer engine does remotely."""
    import ctypes

    for s, d, n in plan:
        ctypes.memmove(d, s, n)

