"""The expert-parallel group: the ranks that share one layer's routed experts.

Two layouts (docs/parallelism.md, "Expert parallelism"):

* EP inside TP (--tp-size N --ep-size N): the EP group is the TP world; attention and
  the dense layers stay tensor-parallel, each rank holds num_physical / N experts whole;
* DP-attention (--enable-dp-attention, with --dp-size N): the N ranks form one world
  in which each rank is a full replica of everything but the routed experts, with its
  own requests and KV cache; the TP group each layer sees is of size 1, and only the
  MoE layers talk across ranks.

The collectives are torch.distributed's on the device group (NCCL on CUDA, gloo on
CPU): all_to_all_single with split sizes for dispatch and combine, point-to-point
sends for moving expert weights, all-reduce for the load counts. Python objects and
the per-step "does anyone have work" vote go over the gloo CPU group.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from radixserve.configs.parallel_config import ParallelConfig
from radixserve.distributed import parallel_state
from radixserve.distributed.parallel_state import TpGroup

logger = logging.getLogger(__name__)


@dataclass
class EpGroup:
    rank: int = 0
    size: int = 1
    device_group: Any = None  # dist.ProcessGroup; None when size == 1
    cpu_group: Any = None
    device: torch.device = torch.device("cpu")

    def all_to_all(self, x: torch.Tensor, send_counts: list[int], recv_counts: list[int]
                   ) -> torch.Tensor:
        """Rows x[sum(send_counts[:r]) : ...] go to rank r; the rows every rank sent
        here come back in rank order (recv_counts[r] from rank r)."""
        if self.size == 1:
            return x
        out = x.new_empty((sum(recv_counts), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv_counts,
                               input_split_sizes=send_counts, group=self.device_group)
        return out

    def exchange_counts(self, send_counts: torch.Tensor) -> torch.Tensor:
        """send_counts [size] (on the device) -> how many rows each rank sends here."""
        if self.size == 1:
            return send_counts
        recv = torch.empty_like(send_counts)
        dist.all_to_all_single(recv, send_counts, group=self.device_group)
        return recv

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.device_group)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x (same shape) stacked along a new first dimension."""
        if self.size == 1:
            return x.unsqueeze(0)
        out = x.new_empty((self.size * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous(), group=self.device_group)
        return out.view(self.size, *x.shape)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.size > 1:
            dist.broadcast(x, src=src, group=self.device_group)
        return x

    def send_recv(self, sends: list[tuple[torch.Tensor, int]],
                  recvs: list[tuple[torch.Tensor, int]]) -> None:
        """Post every send and receive of one exchange at once and wait for them all."""
        if self.size == 1 or not (sends or recvs):
            return
        ops = ([dist.P2POp(dist.isend, t, peer, self.device_group) for t, peer in sends]
               + [dist.P2POp(dist.irecv, t, peer, self.device_group) for t, peer in recvs])
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    def any_true(self, flag: bool) -> bool:
        """Whether any rank's flag is set (over the CPU group)."""
        if self.size == 1:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return bool(t.item())

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's picklable object, in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj, group=self.cpu_group)
        return out


_EP = EpGroup()


def get_ep_group() -> EpGroup:
    return _EP


def set_ep_group(group: EpGroup) -> None:
    """Install this process's EP group (tests build one by hand)."""
    global _EP
    _EP = group


def ep_group_from_tp(tp: TpGroup, ep_size: int, device: torch.device) -> EpGroup:
    """EP inside TP: the EP group is the whole TP world (ep_size == tp_size)."""
    if ep_size != tp.size:
        raise ValueError(f"ep_size={ep_size} must equal tp_size={tp.size}")
    return EpGroup(tp.rank, tp.size, tp.device_group, tp.cpu_group, device)


def init_dp_attention_group(parallel: ParallelConfig, rank: int, dist_addr: str
                            ) -> EpGroup:
    """Join the DP-attention world of dp_size ranks at `dist_addr` (blocks until all
    arrive). Each rank keeps a TP group of size 1: its layers are whole."""
    size = parallel.dp_size
    cuda = parallel.device == "cuda"
    parallel_state.bind_device(parallel, rank, 0)
    timeout = (datetime.timedelta(seconds=parallel.dist_timeout)
               if parallel.dist_timeout else None)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://{dist_addr}",
                            world_size=size, rank=rank, timeout=timeout)
    cpu_group = dist.new_group(backend="gloo", timeout=parallel_state._CPU_GROUP_TIMEOUT)
    device = torch.device(parallel.device)
    group = EpGroup(rank, size, dist.group.WORLD, cpu_group, device)
    set_ep_group(group)
    # Create the device communicator now, outside any forward.
    group.all_reduce_sum(torch.zeros(1, device=device))
    logger.info("DP-attention rank %d/%d joined %s (%s)", rank, size, dist_addr,
                "nccl" if cuda else "gloo")
    return group


def destroy_ep_group() -> None:
    global _EP
    if _EP.size > 1 and dist.is_initialized() and parallel_state.get_tp_group().size == 1:
        dist.destroy_process_group()
    _EP = EpGroup()
