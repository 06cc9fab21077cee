"""The prefill and decode roles against each other without a model: real KV pools,
allocators and radix caches on both sides, the real bootstrap server and Mooncake's
TransferEngine (TCP, loopback) moving the pages. The scheduler's part is played by
hand: what it would compute (a prompt's KV, its first token) is written directly.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

from radixserve.configs.disaggregation_config import DisaggregationConfig
from radixserve.core.req import Req
from radixserve.core.sampling_params import SamplingParams
from radixserve.disaggregation.decode import DecodeRole
from radixserve.disaggregation.prefill import PrefillRole
from radixserve.managers.kv_accounting import KVAccounting
from radixserve.mem_cache.allocator import TokenToKVPoolAllocator
from radixserve.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool, ReqToTokenPool
from radixserve.mem_cache.radix_cache import RadixCache
from tests.conftest import free_port

PAGE = 4
TOKENS = 64


class Side:
    """One server's KV state, and the scheduler's finish as the roles see it."""

    def __init__(self, layout: str) -> None:
        slots = TOKENS + PAGE - 1  # as ModelRunner sizes it: pages 1..TOKENS / PAGE
        if layout == "mha":
            self.pool: Any = MHATokenToKVPool(slots, torch.float16, 2, 8, 3, "cpu")
        else:
            self.pool = MLATokenToKVPool(slots, torch.bfloat16, 16, 4, 3, "cpu")
        allocator = TokenToKVPoolAllocator(TOKENS, PAGE, "cpu")
        rows = ReqToTokenPool(8, 128, "cpu")
        self.kv = KVAccounting(rows, allocator, RadixCache(rows, allocator, PAGE), PAGE)
        self.reasons: dict[str, dict[str, Any]] = {}

    def finish(self, req: Req, reason: dict[str, Any]) -> None:
        req.finished_reason = reason
        self.reasons[req.rid] = reason
        self.kv.release(req)

    def buffers(self) -> list[torch.Tensor]:
        if hasattr(self.pool, "kv_buffer"):
            return list(self.pool.kv_buffer)
        return list(self.pool.k_buffer) + list(self.pool.v_buffer)

    def rows_of(self, req: Req, n: int) -> list[torch.Tensor]:
        slots = self.kv.req_to_token_pool.read(req.req_pool_idx, n)
        return [b[slots] for b in self.buffers()]

    def idle(self) -> bool:
        cache = self.kv.tree_cache
        return self.kv.allocator.available_size() + cache.evictable_size() == TOKENS


def _config(mode: str, port: int) -> DisaggregationConfig:
    # Pairing (claim, then the first status reply) must fit in the bootstrap timeout even
    # on a loaded 2-core CI machine (a tighter one was missed there), and the KV wait must end
    # well after it, so that each timeout test sees the timeout it is about.
    return DisaggregationConfig(mode=mode, bootstrap_port=port, bootstrap_timeout_s=5.0,
                                waiting_timeout_s=9.0)


def _req(rid: str, prompt: list[int], port: int, room: int) -> Req:
    req = Req(rid, prompt, SamplingParams(max_new_tokens=8))
    req.bootstrap_host, req.bootstrap_port, req.bootstrap_room = "127.0.0.1", port, room
    return req


def _prefill_by_hand(side: Side, req: Req, first_token: int) -> None:
    """What the scheduler does for a prefill: slots, the prompt's KV, the first token."""
    req.init_next_round_input(side.kv.tree_cache)
    assert side.kv.claim_row(req)
    n = len(req.origin_input_ids)
    slots = side.kv.alloc_for_req(req, n)
    assert slots is not None
    for b in side.buffers():
        b[slots] = torch.randn(b[slots].shape).to(b.dtype)
    req.kv_committed_len = n
    side.kv.cache_unfinished(req)
    req.output_ids, req.num_resolved = [first_token], 1


def _run(roles: list[Any], until: Any, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not until():
        assert time.monotonic() < deadline, "the roles never got there"
        for role in roles:
            role.poll()
        time.sleep(0.01)


@pytest.fixture(params=["mha", "mla"])
def pair(request: pytest.FixtureRequest) -> Any:
    port = free_port()
    p, d = Side(request.param), Side(request.param)
    prefill = PrefillRole(_config("prefill", port), p.kv, p.pool, PAGE, p.finish,
                          lambda rid, reason: None)
    decode = DecodeRole(_config("decode", port), d.kv, d.pool, PAGE, d.finish,
                        lambda req: None, lambda req, idx: None)
    yield p, d, prefill, decode, port
    prefill.server.close()


def test_pages_arrive_and_both_pools_return_to_idle(pair: Any) -> None:
    p, d, prefill, decode, port = pair
    prompt = list(range(100, 111))  # 11 tokens: two full pages and a partial one
    p_req, d_req = _req("p", prompt, port, 7), _req("d", prompt, port, 7)
    for role, req in ((prefill, p_req), (decode, d_req)):
        role.check_request(req)
        role.enqueue(req, [])
    _prefill_by_hand(p, p_req, first_token=42)
    assert prefill.decodes_here(p_req) is False
    sent = p.rows_of(p_req, len(prompt))
    joined: list[Req] = []
    deadline = time.monotonic() + 20
    while not joined:
        assert time.monotonic() < deadline
        prefill.poll()
        joined += decode.poll()
        time.sleep(0.01)
    assert joined == [d_req] and d_req.output_ids == [42]
    for got, want in zip(d.rows_of(d_req, len(prompt)), sent):
        assert torch.equal(got, want)
    _run([prefill], lambda: p.reasons.get("p") is not None)
    assert p.reasons["p"]["type"] == "length"
    assert p.idle() and not p.kv.tree_cache.protected_size()
    # The decode side's prompt is in its radix cache now, shared like a computed one.
    assert d.kv.tree_cache.match_prefix(prompt).device_indices.numel() == 8
    d.finish(d_req, {"type": "length", "length": 1})
    assert d.idle()


def test_claim_wait_times_out_and_the_prefill_side_frees_its_pages(pair: Any) -> None:
    p, d, prefill, decode, port = pair
    req = _req("p", list(range(9)), port, 8)
    prefill.enqueue(req, [])
    _prefill_by_hand(p, req, first_token=1)
    prefill.decodes_here(req)
    assert not p.idle()  # pinned
    _run([prefill], lambda: "p" in p.reasons)
    assert p.reasons["p"]["status_code"] == 500
    assert "no decode server claimed bootstrap_room 8" in p.reasons["p"]["message"]
    assert p.idle()


@pytest.mark.parametrize("prefill_has_it", [False, True])
def test_kv_that_never_comes_times_out_and_the_decode_side_frees_its_pages(
        pair: Any, prefill_has_it: bool) -> None:
    """The prefill half never arrives (the pairing times out), or arrives and never gets
    its prefill (the KV wait times out)."""
    p, d, prefill, decode, port = pair
    req = _req("d", list(range(9)), port, 9)
    if prefill_has_it:
        prefill.enqueue(_req("p", list(range(9)), port, 9), [])
    decode.enqueue(req, [])
    _run([decode], lambda: not d.idle())  # allocated and claimed
    _run([prefill, decode], lambda: "d" in d.reasons)
    assert d.reasons["d"]["status_code"] == 500
    want = "did not arrive" if prefill_has_it else "has not received the request"
    assert want in d.reasons["d"]["message"]
    assert d.idle() and d.kv.tree_cache.evictable_size() == 0  # nothing cached


def test_decode_abort_frees_the_prefill_half(pair: Any) -> None:
    p, d, prefill, decode, port = pair
    p_req, d_req = _req("p", list(range(9)), port, 10), _req("d", list(range(9)), port, 10)
    prefill.enqueue(p_req, [])
    decode.enqueue(d_req, [])
    _prefill_by_hand(p, p_req, first_token=3)
    d_req.to_abort = True  # the client left before the KV arrived
    _run([decode], lambda: "d" in d.reasons)
    prefill.decodes_here(p_req)
    _run([prefill], lambda: "p" in p.reasons)
    assert p.reasons["p"]["type"] == "abort" and p.idle() and d.idle()


def test_unreachable_prefill_server_fails_the_request(pair: Any) -> None:
    p, d, prefill, decode, port = pair
    req = _req("d", list(range(9)), free_port(), 11)  # nobody listens there
    decode.enqueue(req, [])
    _run([decode], lambda: "d" in d.reasons, timeout_s=10)
    assert "unreachable" in d.reasons["d"]["message"]
    assert d.idle()


def test_unpaired_request_is_refused(pair: Any) -> None:
    _, _, prefill, decode, _ = pair
    for role in (prefill, decode):
        with pytest.raises(ValueError, match="bootstrap_room"):
            role.check_request(Req("x", [1, 2], SamplingParams()))
