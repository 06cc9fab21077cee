"""SGLang's batch log lines: one per prefill batch, one every --decode-log-interval
decode steps. Tools that grep SGLang's logs read these fields by the same names."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PrefillBatchStats:
    new_seq: int  # requests with (a chunk of) their prompt in the batch
    new_token: int  # prompt tokens computed
    cached_token: int  # prompt tokens reused from the prefix cache
    token_usage: float
    running_req: int  # requests already decoding when the batch was formed
    queue_req: int


@dataclass
class DecodeBatchStats:
    running_req: int
    num_token: int  # KV slots in use
    token_usage: float
    gen_throughput: float  # tokens decoded per second since the last decode line
    queue_req: int


def prefill_line(s: PrefillBatchStats) -> str:
    return (f"Prefill batch, #new-seq: {s.new_seq}, #new-token: {s.new_token}, "
            f"#cached-token: {s.cached_token}, token usage: {s.token_usage:.2f}, "
            f"#running-req: {s.running_req}, #queue-req: {s.queue_req}, ")


def decode_line(s: DecodeBatchStats) -> str:
    return (f"Decode batch, #running-req: {s.running_req}, #token: {s.num_token}, "
            f"token usage: {s.token_usage:.2f}, "
            f"gen throughput (token/s): {s.gen_throughput:.2f}, #queue-req: {s.queue_req}, ")
