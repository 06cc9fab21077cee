"""Host → device copies that never block the host.

A plain `tensor.to("cuda")` (or torch.tensor(..., device="cuda")) from pageable memory
is a synchronous copy: it waits for every kernel already queued. The overlapped
scheduler prepares batch N+1 while batch N runs, so each of those waits would stall it
on the batch in flight. Through pinned memory the copy is queued like a kernel instead.
"""

from __future__ import annotations

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
