"""Programmatic dependent launch (PDL, Hopper and later) for the Triton kernels.

A decode step is hundreds of short kernels; between two of them the GPU normally
drains the first grid, flushes its memory, then launches and ramps up the second. With
PDL a kernel is launched while its predecessor is still finishing: its programs start,
wait at `pdl_wait` until the predecessor's writes are visible, and go on. Each kernel
signals with `pdl_launch_dependents` once its programs have done their loads, so the
next launch overlaps its stores. Inside a CUDA graph the same edges are captured.

The rule that keeps this correct: a kernel launched with PDL calls `pdl_wait` before
it touches any memory a previous kernel may write or read. The one exception is
memory no kernel ever writes: the GEMV loads its first weight tile before it waits, so
that weight stream overlaps the previous kernel's tail. Every other kernel waits first
thing, so its overlap is launch latency and ramp-up only, never data.

Off on CPU (the interpreter has no grid dependency control), before Hopper, and with
RADIXSERVE_DISABLE_PDL=1 (for A/B timing).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from radixserve.envs import envs


@functools.cache
def _enabled(device_index: int) -> bool:
    if envs.RADIXSERVE_DISABLE_PDL.get():
        return False
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def pdl_kwargs(t: torch.Tensor) -> dict:
    """Launch arguments for a kernel with a `USE_PDL` constexpr, on t's device."""
    if t.is_cuda and _enabled(t.device.index if t.device.index is not None
                              else torch.cuda.current_device()):
        return {"USE_PDL": True, "launch_pdl": True}
    return {"USE_PDL": False}


@triton.jit
def pdl_wait(USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def pdl_launch_dependents(USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
