"""Host → device copies that never block the host.

A plain `tensor.to("cuda")` (or torch.tensor(..., device="cuda")) from pageable memory
is a synchronous copy: it waits for every kernel already queued. The overlapped
scheduler prepares batch N+1 while batch N runs, so each of those waits would stall it
on the batch in flight. Through pinned memory the copy is queued like a kernel instead.
"""

from __future__ import annotations

import functools

import torch


def to_device_async(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`t` (on the host) on `device`, queued without waiting."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type == "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def host_to_device(values: list, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A tensor on `device` from a Python list, queued without waiting."""
    return to_device_async(torch.tensor(values, dtype=dtype), device)


def to_device_beside(tensors: list[torch.Tensor], device: torch.device | str
                     ) -> list[torch.Tensor]:
    """Pinned host tensors on the CUDA `device`, copied on a side stream so that the
    copies run beside the kernels already queued on the current stream instead of after
    them. Whatever is queued on the current stream after this call waits for them.

    The device tensors come from the side stream's pool of the caching allocator and
    are read on the current one: record_stream keeps the allocator from handing their
    memory to a later side-stream copy before the current stream is done reading. The
    caller keeps each host tensor unchanged until work queued after this call is done.
    """
    compute = torch.cuda.current_stream(device)
    side = _side_stream(compute.device)
    with torch.cuda.stream(side):
        out = [t.to(device, non_blocking=True) for t in tensors]
    for t in out:
        t.record_stream(compute)
    compute.wait_stream(side)
    return out


@functools.cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)
