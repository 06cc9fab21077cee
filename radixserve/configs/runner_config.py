"""RunnerConfig: the part of ServerArgs that ModelRunner reads.

Built by `ServerArgs.runner_config()`; the model runner sits below server_args in the
package's layers, so it receives this view instead of the whole ServerArgs.
"""

from __future__ import annotations

from dataclasses import dataclass

from radixserve.configs.ep_config import EpConfig
from radixserve.configs.load_config import LoadConfig


@dataclass(frozen=True)
class RunnerConfig:
    load: LoadConfig  # what load_model reads
    device: str = "cpu"
    page_size: int = 1
    random_seed: int = 0
    mem_fraction_static: float = 0.85
    max_total_tokens: int | None = None  # None: profiled from free memory
    max_running_requests: int | None = None  # None: from the KV pool size
    attention_backend: str = "torch_native"
    disable_cuda_graph: bool = True
    cuda_graph_max_bs: int | None = None
    disable_radix_cache: bool = False
    disable_cascade_attention: bool = False
    enable_symm_mem_all_reduce: bool = False
    enable_nccl_symm_all_reduce: bool = False
    ep: EpConfig = EpConfig()  # expert parallelism, DP-attention, EPLB, the recorder
    mm_embedding_cache_bytes: int = 1 << 30  # vision-encoder outputs kept by image hash
