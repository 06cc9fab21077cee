"""The tensor-parallel group of this process: rank, size and the collectives layers use.

Each TP group is its own torch.distributed world (DP replicas never talk to each
other), with two communicators:

* the device group: NCCL on CUDA, gloo on CPU; carries the activations
  (all-reduce after row-parallel layers, all-gather of logits) and the sampled ids;
* the CPU group: always gloo; carries Python objects (the scheduler's commands that
  rank 0 broadcasts each step). Followers block on it while the server is idle, so it
  waits without a deadline; a dead peer still breaks it at once (gloo sees the closed
  socket), which is how a follower learns that rank 0 is gone.

Processes that never call `init_tp_group` see a group of size 1, whose collectives are
no-ops, so single-GPU code paths pay nothing.

Small all-reduces on CUDA (a decode step's activations: a few KB to a few MB) can
leave NCCL-on-a-plain-tensor for one of two opt-in paths, both on torch's symmetric
memory (torch keeps one symmetric-memory backend per process, so at most one is on):

* the NCCL window (--enable-nccl-symm-all-reduce): a buffer allocated by NCCL and
  registered on every rank as a symmetric window, on which NCCL (>= 2.27) runs its
  symmetric kernels: they read the peers' copies directly instead of staging them
  through NCCL's channels. Each all-reduce of a forward pass gets its own slot of the
  window (`begin_forward` starts the next pass at the window's start), so its sum
  stays valid for the rest of the pass and is returned in place, with no copy out.
  Row-parallel layers write their product straight into the next slot
  (`all_reduce_buffer`), so there is no copy in either; other inputs are copied in.
  Slots sit at the same offsets on every rank, as NCCL's symmetric kernels need,
  because every rank runs the same all-reduces in the same order. In the Qwen3-8B
  TP=2 decode graph NCCL's symmetric kernel is several times faster per small
  all-reduce than NCCL on a plain tensor, whatever its protocol or channel settings,
  and the step got faster with it (docs/benchmarks.md, "Fifth pass");
* the one-shot kernel (--enable-symm-mem-all-reduce, torch's own backend): copies the
  local input into a buffer every rank can address, meets its peers at a barrier and
  sums all their buffers over NVLink. No faster than NCCL on 2 x H200.
"""

from __future__ import annotations

import datetime
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from radixserve.configs.parallel_config import ParallelConfig

logger = logging.getLogger(__name__)

# The CPU group's wait for rank 0's next command: an idle server sends none.
_CPU_GROUP_TIMEOUT = datetime.timedelta(days=30)


# Activations up to this size take the one-shot path: each rank reads every peer's copy,
# so its cost grows with size x ranks; past a few MB (prefill) NCCL's ring is better.
# The NCCL window takes all-reduces up to this size too.
_SYMM_MEM_MAX_BYTES = 4 << 20
# The NCCL window: room for every all-reduce of a decode pass up to a batch of ~56 for
# Qwen3-8B (73 x 8 KB per row), ~280 for Qwen3-0.6B (57 x 2 KB per row). A pass that
# needs more sends the rest through NCCL on plain tensors.
_WINDOW_BYTES = 32 << 20
# Slot alignment in the window: whole 16-byte vectors for the kernels writing into it,
# rounded up to a cache line.
_SLOT_ALIGN = 128
# The one-shot kernel is built for these element types only.
_SYMM_MEM_DTYPES = (torch.bfloat16, torch.float32)


@dataclass
class TpGroup:
    rank: int = 0
    size: int = 1
    device_group: Any = None  # dist.ProcessGroup; None when size == 1
    cpu_group: Any = None
    # The symmetric-memory buffer of the fast small all-reduce (None: NCCL only), and
    # which path uses it: "nccl_window" (bytes, viewed as each input's dtype) or
    # "one_shot" (typed).
    symm_buffer: torch.Tensor | None = None
    symm_kind: str = ""
    # Bytes of the NCCL window that this forward pass's all-reduces hold.
    window_used: int = 0

    def begin_forward(self) -> None:
        """A new forward pass: its all-reduces take the NCCL window from its start again.
        Call it before every pass (eager, and each CUDA graph's capture), once nothing
        of the previous pass's all-reduce results is still to be read: the results of
        a pass live in the window until the next pass overwrites them."""
        self.window_used = 0

    def all_reduce_buffer(self, shape: tuple[int, ...], dtype: torch.dtype
                          ) -> torch.Tensor | None:
        """Where to compute the next all-reduce's input so that it needs no copy (a slot
        of the NCCL window), or None: then compute it anywhere. The caller must pass
        what it writes there to `all_reduce` next, on every rank alike."""
        if self.symm_kind != "nccl_window":
            return None
        slot = self._window_slot(math.prod(shape) * dtype.itemsize)
        return None if slot is None else slot.view(dtype).view(shape)

    def _window_slot(self, nbytes: int) -> torch.Tensor | None:
        """The next free bytes of the window for this pass, or None when it is full or
        the all-reduce is too large to gain from it."""
        buf = self.symm_buffer
        start = self.window_used
        if buf is None or nbytes > _SYMM_MEM_MAX_BYTES or start + nbytes > buf.numel():
            return None
        self.window_used = start + -(-nbytes // _SLOT_ALIGN) * _SLOT_ALIGN
        return buf[start:start + nbytes]

    def _in_window(self, x: torch.Tensor) -> bool:
        buf = self.symm_buffer
        start = buf.data_ptr()
        return (x.is_contiguous() and start <= x.data_ptr()
                and x.data_ptr() + x.numel() * x.element_size() <= start + buf.numel())

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks. Use the return value: NCCL and the NCCL window sum in place
        (the window into a slot of its own unless x is in the window already), the
        one-shot path returns a new tensor (copying it back would cost a kernel per
        call). A result in the window is valid until the next `begin_forward`."""
        if self.size == 1:
            return x
        buf = self.symm_buffer
        if buf is not None and self.symm_kind == "nccl_window":
            if not self._in_window(x):
                slot = (self._window_slot(x.numel() * x.element_size())
                        if x.is_contiguous() else None)
                if slot is None:
                    dist.all_reduce(x, group=self.device_group)
                    return x
                x = slot.view(x.dtype).view_as(x).copy_(x)
            # Every rank's x is at the same offset of its window: NCCL's symmetric
            # kernels run on it.
            dist.all_reduce(x, group=self.device_group)
            return x
        # The kernel copies x into the buffer with the widest vector both allow: x
        # must start and end on 16 bytes, as the buffer does.
        if (buf is not None and x.dtype == buf.dtype and x.numel() <= buf.numel()
                and x.is_contiguous() and x.data_ptr() % 16 == 0
                and x.numel() * x.element_size() % 16 == 0):
            out = torch.empty_like(x)
            torch.ops.symm_mem.one_shot_all_reduce_copy_out(
                buf[:x.numel()].view_as(x), x, "sum", self.device_group.group_name, out)
            return out
        dist.all_reduce(x, group=self.device_group)
        return x

    def enable_symm_mem_all_reduce(self, dtype: torch.dtype, device: torch.device) -> bool:
        """Route small all-reduces of `dtype` through symmetric memory; False (NCCL
        stays) where this torch or GPU cannot. Collective: every rank calls it, at the
        same point, before any CUDA graph is captured."""
        if self.size == 1 or device.type != "cuda" or dtype not in _SYMM_MEM_DTYPES:
            return False

        def make_buffer(symm_mem: Any) -> torch.Tensor:
            name = self.device_group.group_name
            if hasattr(symm_mem, "enable_symm_mem_for_group"):  # needed before torch 2.8
                symm_mem.enable_symm_mem_for_group(name)
            buf = symm_mem.empty(_SYMM_MEM_MAX_BYTES // dtype.itemsize, dtype=dtype,
                                 device=device)
            symm_mem.rendezvous(buf, name)
            return buf

        return self._set_up_symm_path("one_shot", "symmetric memory (one-shot)", make_buffer,
                                      (dtype,), device)

    def enable_nccl_window_all_reduce(self, device: torch.device) -> bool:
        """Route all-reduces up to _SYMM_MEM_MAX_BYTES through a buffer registered with
        NCCL as a symmetric window; False (plain NCCL stays) where this torch, NCCL or
        GPU cannot, or another symmetric-memory backend is already in use. Collective:
        every rank calls it, at the same point, before any CUDA graph is captured."""
        if self.size == 1 or device.type != "cuda" or self.symm_buffer is not None:
            return False

        def make_buffer(symm_mem: Any) -> torch.Tensor:
            # The window is registered with this group's NCCL communicator, which must
            # exist by then: a group made without a device id creates it lazily, at
            # its first collective. (Without this, ranks of such a group never got
            # past the set-up on 2 x H200.)
            dist.all_reduce(torch.zeros(1, device=device), group=self.device_group)
            symm_mem.set_backend("NCCL")
            buf = symm_mem.empty(_WINDOW_BYTES, dtype=torch.uint8, device=device)
            symm_mem.rendezvous(buf, self.device_group.group_name)
            return buf

        # One window serves every dtype: probe each.
        return self._set_up_symm_path("nccl_window", "an NCCL symmetric window", make_buffer,
                                      _SYMM_MEM_DTYPES, device)

    def _set_up_symm_path(self, kind: str, what: str,
                          make_buffer: Callable[[Any], torch.Tensor],
                          probe_dtypes: tuple[torch.dtype, ...], device: torch.device) -> bool:
        """Make the buffer, probe the path in each dtype, and keep it only where every
        rank did all of that; any failure leaves plain NCCL on every rank."""
        try:
            import torch.distributed._symmetric_memory as symm_mem

            self.symm_buffer, self.symm_kind = make_buffer(symm_mem), kind
            for dtype in probe_dtypes:
                self._probe_symm_all_reduce(dtype, device)
            self.begin_forward()  # the probes' slots are free again
        except Exception as exc:  # noqa: BLE001 - an optional fast path: NCCL stays
            self.symm_buffer, self.symm_kind = None, ""
            logger.warning("all-reduce through %s unavailable, using NCCL: %s", what, exc)
        if not self._all_agree(self.symm_buffer is not None):
            return False
        logger.info("TP all-reduces up to %d KiB use %s", _SYMM_MEM_MAX_BYTES >> 10, what)
        return True

    def _all_agree(self, ok: bool) -> bool:
        """True where every rank's `ok` is; otherwise drop this rank's fast path too.
        Ranks on different paths would wait on each other forever in the first
        all-reduce. (A rank that fails before the rendezvous still leaves its peers
        waiting in it: that cannot be undone from here.)"""
        if self.cpu_group is not None:  # hand-built groups in tests have none
            ok = self.min_int(int(ok)) == 1
        if not ok:
            self.symm_buffer, self.symm_kind = None, ""
        return ok

    def _probe_symm_all_reduce(self, dtype: torch.dtype, device: torch.device) -> None:
        """Raise unless the fast path sums a small tensor right on every rank."""
        probe = torch.full((8,), float(self.rank + 1), dtype=dtype, device=device)
        total = self.all_reduce(probe)
        expected = self.size * (self.size + 1) / 2
        if not bool((total == expected).all()):
            raise RuntimeError(f"{self.symm_kind} all-reduce gave {total.tolist()}, "
                               f"expected {expected}")

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's `x` along `dim`, in rank order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.device_group)
        return torch.cat(parts, dim=dim)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Every rank gets rank `src`'s values, in place."""
        if self.size > 1:
            dist.broadcast(x, src=src, group=self.device_group)
        return x

    def broadcast_object(self, obj: Any = None, src: int = 0) -> Any:
        """Rank `src`'s picklable object on every rank (over the CPU group)."""
        if self.size == 1:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, group=self.cpu_group)
        return box[0]

    def min_int(self, value: int) -> int:
        """The smallest `value` over ranks (so that all ranks size their KV alike)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t.item())


_TP = TpGroup()


def get_tp_group() -> TpGroup:
    return _TP


def resolve_tp(tp_rank: int | None, tp_size: int | None) -> tuple[int, int]:
    """A layer's (rank, size): as given (tests build shards by hand), else this process's."""
    return (_TP.rank if tp_rank is None else tp_rank,
            _TP.size if tp_size is None else tp_size)


def kv_heads_per_rank(total_kv_heads: int, tp_size: int) -> int:
    """KV heads each rank stores: split when there are enough, else one replicated head
    (QKVParallelLinear gives rank r the head r // (tp_size / total_kv_heads))."""
    return max(1, total_kv_heads // tp_size)


def gpu_id_for(parallel: ParallelConfig, tp_rank: int, dp_rank: int) -> int:
    """This rank's local CUDA device: replicas take consecutive blocks of GPUs."""
    per_node = parallel.tp_size // parallel.nnodes
    return parallel.base_gpu_id + dp_rank * per_node + tp_rank % per_node


def bind_device(parallel: ParallelConfig, tp_rank: int, dp_rank: int) -> None:
    """Make this rank's GPU the current device (every later `cuda` tensor lands there)."""
    if parallel.device == "cuda":
        torch.cuda.set_device(gpu_id_for(parallel, tp_rank, dp_rank))


def init_tp_group(parallel: ParallelConfig, tp_rank: int, dist_addr: str,
                  dp_rank: int = 0) -> TpGroup:
    """Join the TP world of one replica (blocks until all tp_size ranks arrive)."""
    global _TP
    size = parallel.tp_size
    cuda = parallel.device == "cuda"
    bind_device(parallel, tp_rank, dp_rank)
    timeout = (datetime.timedelta(seconds=parallel.dist_timeout)
               if parallel.dist_timeout else None)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://{dist_addr}",
                            world_size=size, rank=tp_rank, timeout=timeout)
    cpu_group = dist.new_group(backend="gloo", timeout=_CPU_GROUP_TIMEOUT)
    _TP = TpGroup(tp_rank, size, dist.group.WORLD, cpu_group)
    # Create the NCCL communicator now, outside any CUDA graph capture.
    _TP.all_reduce(torch.zeros(1, device=torch.device(parallel.device)))
    logger.info("TP rank %d/%d of DP replica %d joined %s (%s)", tp_rank, size, dp_rank,
                dist_addr, "nccl" if cuda else "gloo")
    return _TP


def destroy_tp_group() -> None:
    global _TP
    if _TP.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
    _TP = TpGroup()
