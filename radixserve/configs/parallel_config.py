"""ParallelConfig: the part of ServerArgs that placing and joining TP/DP ranks needs.

Built by `ServerArgs.parallel_config()`; read by distributed.parallel_state
(`init_tp_group`, `bind_device`, `gpu_id_for`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelConfig:
    tp_size: int = 1
    dp_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None  # host:port of TP rank 0
    dist_timeout: int | None = None  # seconds a collective may wait; None: torch's default
    base_gpu_id: int = 0
    device: str = "cpu"
