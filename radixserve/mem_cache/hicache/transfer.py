"""Copies between the device KV pool and the host pool.

Device → host (a backup) runs on the stream that computes the KV, after the forward
that wrote it, so it needs no synchronisation; the host rows are valid once its event
has fired (the storage tier waits for that before reading them).

Host → device (a load-back) runs layer by layer on a stream of its own: `LayerLoad`
issues layer i's copy and records an event, and the forward waits for that event just
before its attention reads layer i (`wait`, called through the device pool's
`layer_ready` hook), so layer 0 computes while later layers still copy. On the CPU
there is no second stream: the same calls copy each layer synchronously when the
forward reaches it.

Two ways to copy (`--hicache-io-backend`): `kernel` gathers the rows of a layer on the
device into one contiguous tensor and moves it with one copy per run of consecutive
host rows; `direct` copies page by page. `reference_copy` is the plain indexed copy
both are tested against.
"""

from __future__ import annotations

import torch


def reference_copy(dst: torch.Tensor, dst_idx: torch.Tensor, src: torch.Tensor,
                   src_idx: torch.Tensor) -> None:
    """dst[dst_idx] = src[src_idx], across devices."""
    dst[dst_idx.to(dst.device)] = src[src_idx.to(src.device)].to(dst.device)


def host_runs(host_idx: list[int]) -> list[tuple[int, int, int]]:
    """(offset in host_idx, first host row, length) of each run of consecutive rows."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(host_idx) + 1):
        if i == len(host_idx) or host_idx[i] != host_idx[i - 1] + 1:
            runs.append((start, host_idx[start], i - start))
            start = i
    return runs


def _page_runs(host_idx: list[int], page_size: int) -> list[tuple[int, int, int]]:
    return [(i, host_idx[i], page_size) for i in range(0, len(host_idx), page_size)]


class KVTransfer:
    """The copies between one device pool's buffers and one host pool's buffers."""

    def __init__(self, device_buffers: list[list[torch.Tensor]],
                 host_buffers: list[torch.Tensor], io_backend: str, page_size: int) -> None:
        self.device_buffers = device_buffers
        self.host_buffers = host_buffers
        self.num_layers = len(device_buffers[0])
        self.device = device_buffers[0][0].device
        self.io_backend = io_backend
        self.page_size = page_size
        self.cuda = self.device.type == "cuda"
        self.load_stream = torch.cuda.Stream(self.device) if self.cuda else None

    def _runs(self, host_idx: list[int]) -> list[tuple[int, int, int]]:
        if self.io_backend == "direct":
            return _page_runs(host_idx, self.page_size)
        return host_runs(host_idx)

    def to_host(self, device_idx: torch.Tensor, host_idx: torch.Tensor
                ) -> "torch.cuda.Event | None":
        """Copy device rows device_idx into host rows host_idx, every layer, on the
        current stream; returns the event after which the host rows are valid."""
        if len(device_idx) == 0:
            return None
        runs = self._runs(host_idx.tolist())
        dev_idx = device_idx.to(self.device, non_blocking=True)
        for dev_layers, host in zip(self.device_buffers, self.host_buffers):
            for layer, dev in enumerate(dev_layers):
                rows = dev.index_select(0, dev_idx)
                for off, first, n in runs:
                    host[layer, first:first + n].copy_(rows[off:off + n], non_blocking=True)
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def start_load(self, host_idx: torch.Tensor, device_idx: torch.Tensor) -> "LayerLoad":
        return LayerLoad(self, host_idx, device_idx)

    def load_layer(self, layer: int, host_idx: list[int], dev_idx: torch.Tensor,
                   runs: list[tuple[int, int, int]]) -> None:
        """Copy one layer's host rows to the device (on the current stream)."""
        n_rows = len(host_idx)
        for dev_layers, host in zip(self.device_buffers, self.host_buffers):
            dev = dev_layers[layer]
            staged = torch.empty((n_rows, *dev.shape[1:]), dtype=dev.dtype, device=self.device)
            for off, first, n in runs:
                staged[off:off + n].copy_(host[layer, first:first + n], non_blocking=True)
            dev.index_copy_(0, dev_idx, staged)


class LayerLoad:
    """One batch of host → device copies, issued a layer at a time."""

    def __init__(self, transfer: KVTransfer, host_idx: torch.Tensor,
                 device_idx: torch.Tensor) -> None:
        self.t = transfer
        self.host_idx = host_idx.tolist()
        self.runs = transfer._runs(self.host_idx)
        self.device_idx = device_idx
        self.issued = 0  # layers whose copies are enqueued
        self.events: list[torch.cuda.Event] = []
        if transfer.cuda:
            # The rows being overwritten may still be read, and the host rows may still
            # be being written, by work already on the compute stream.
            transfer.load_stream.wait_stream(torch.cuda.current_stream(transfer.device))
            with torch.cuda.stream(transfer.load_stream):
                self.dev_idx = device_idx.to(transfer.device, non_blocking=True)
        else:
            self.dev_idx = device_idx

    def issue_through(self, layer: int) -> None:
        t = self.t
        layer = min(layer, t.num_layers - 1)
        while self.issued <= layer:
            if t.cuda:
                with torch.cuda.stream(t.load_stream):
                    t.load_layer(self.issued, self.host_idx, self.dev_idx, self.runs)
                    event = torch.cuda.Event()
                    event.record()
                self.events.append(event)
            else:
                t.load_layer(self.issued, self.host_idx, self.dev_idx, self.runs)
            self.issued += 1

    def wait(self, layer: int) -> None:
        """Before the forward reads `layer`: its rows have landed (or will have, on the
        compute stream). The next layer's copy is issued first so that it overlaps."""
        self.issue_through(layer + 1)
        if self.t.cuda:
            torch.cuda.current_stream(self.t.device).wait_event(self.events[layer])

    def finish(self) -> None:
        """Issue every layer and make the compute stream wait for all of them."""
        self.issue_through(self.t.num_layers - 1)
        if self.t.cuda:
            torch.cuda.current_stream(self.t.device).wait_stream(self.t.load_stream)
