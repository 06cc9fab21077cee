"""SchedulerConfig: the settings the scheduler's parts read, taken from ServerArgs."""

from __future__ import annotations

from dataclasses import dataclass

from radixserve.server_args import ServerArgs

# The share of its remaining max_new_tokens that admission first assumes a running
# request will use, before --schedule-conservativeness scales it.
INIT_NEW_TOKEN_RATIO = 0.7


@dataclass(frozen=True)
class SchedulerConfig:
    page_size: int
    max_prefill_tokens: int
    chunked_prefill_size: int | None  # None: no chunking
    enable_mixed_chunk: bool
    schedule_policy: str
    init_new_token_ratio: float
    disable_radix_cache: bool
    # Whether the overlapped loop may run (it also needs a device that runs
    # asynchronously: CUDA, or the CPU when enable_cpu_overlap asks for it).
    disable_overlap_schedule: bool
    enable_cpu_overlap: bool
    skip_tokenizer_init: bool

    @classmethod
    def from_server_args(cls, sa: ServerArgs) -> "SchedulerConfig":
        chunk = sa.chunked_prefill_size
        return cls(
            page_size=sa.page_size, max_prefill_tokens=sa.max_prefill_tokens,
            chunked_prefill_size=chunk if chunk is not None and chunk > 0 else None,
            enable_mixed_chunk=sa.enable_mixed_chunk, schedule_policy=sa.schedule_policy,
            init_new_token_ratio=min(1.0, INIT_NEW_TOKEN_RATIO * sa.schedule_conservativeness),
            disable_radix_cache=sa.disable_radix_cache,
            disable_overlap_schedule=sa.disable_overlap_schedule,
            enable_cpu_overlap=sa.enable_cpu_overlap, skip_tokenizer_init=sa.skip_tokenizer_init)

    def overlap_on(self, device_type: str) -> bool:
        return not self.disable_overlap_schedule and (device_type == "cuda"
                                                      or self.enable_cpu_overlap)
