"""Cascade decoding: requests that share a cached prefix attend it together.

The kernel against the plain decode reference (which reads every request's whole
KV on its own), the host plan, the radix tree's grouping, and the backend's eager and
CUDA-graph metadata paths. Without CUDA the kernels run in Triton's interpreter.
"""

from __future__ import annotations

import os
import random

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from radixserve.core.forward_batch import ForwardBatch, ForwardMode  # noqa: E402
from radixserve.engine import Engine  # noqa: E402
from radixserve.layers.attention.cascade import (  # noqa: E402
    KV_START, PERM, TILE_COUNT, TILE_START, CascadePlanner, plan_cascade)
from radixserve.layers.attention.triton import TritonAttnBackend  # noqa: E402
from radixserve.layers.attention.triton_ops.decode_attention import (  # noqa: E402
    CascadeInputs, alloc_decode_scratch, cascade_tile_size, decode_attention_fwd,
    decode_attention_reference)
from radixserve.layers.radix_attention import RadixAttention  # noqa: E402
from radixserve.mem_cache.allocator import TokenToKVPoolAllocator  # noqa: E402
from radixserve.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool  # noqa: E402
from radixserve.mem_cache.radix_cache import RadixCache, shared_prefix_groups  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any()
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


class SharedKV:
    """Requests in groups: a group's members hold the same slots for its prefix, then
    slots of their own. A group given as (0, [n]) is a lone request of n tokens."""

    def __init__(self, groups: list[tuple[int, list[int]]], num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.seq_lens = [p + s for p, own in groups for s in own]
        self.keys = [g if p else -1 for g, (p, own) in enumerate(groups) for _ in own]
        self.prefix_lens = [p for p, own in groups for _ in own]
        batch = len(self.seq_lens)
        size = sum(p + sum(own) for p, own in groups) + 11
        num_rows = 2 * batch + 3
        self.rows = torch.randperm(num_rows, generator=gen)[:batch]  # not 0..B-1
        self.req_to_token_pool = ReqToTokenPool(num_rows, max(self.seq_lens) + 8, DEVICE)
        self.kv_pool = MHATokenToKVPool(size, dtype, num_kv_heads, head_dim, 1, DEVICE)
        free = (torch.randperm(size - 1, generator=gen) + 1).tolist()  # slot 0 is reserved
        i = 0
        for p, own in groups:
            prefix = [free.pop() for _ in range(p)]
            for s in own:
                slots = torch.tensor(prefix + [free.pop() for _ in range(s)])
                self.req_to_token_pool.write(int(self.rows[i]), 0, slots.to(DEVICE))
                i += 1
        for buf in (*self.kv_pool.k_buffer, *self.kv_pool.v_buffer):
            buf.copy_(torch.randn(buf.shape, generator=gen).to(dtype))

    @property
    def req_to_token(self) -> torch.Tensor:
        return self.req_to_token_pool.req_to_token


@pytest.mark.parametrize("groups,heads,kv_heads,head_dim,splits,pre_splits,dtype", [
    # GQA 2 (tile of 32): one group of three, a lone request, a group of two.
    ([(40, [3, 17, 1]), (0, [25]), (33, [5, 9])], 8, 4, 64, 2, 4, torch.float32),
    # GQA 16 (tiles of 4): a group of six spans two tiles; a prefix of one token.
    ([(37, [1, 2, 30, 4, 1, 8]), (1, [6, 2])], 16, 1, 80, 4, 2, torch.float16),
    # Prefixes longer than the rest, cut into many splits; one split for the rest.
    ([(70, [2, 3]), (0, [9]), (65, [1, 1, 4])], 4, 2, 96, 1, 8, torch.float32),
])
def test_cascade_decode_matches_reference(groups: list[tuple[int, list[int]]], heads: int,
                                          kv_heads: int, head_dim: int, splits: int,
                                          pre_splits: int, dtype: torch.dtype) -> None:
    kv = SharedKV(groups, kv_heads, head_dim, dtype, seed=len(groups))
    batch = len(kv.seq_lens)
    plan = plan_cascade(kv.keys, kv.prefix_lens, cascade_tile_size(heads // kv_heads))
    assert plan is not None
    rows_d = plan.packed.to(DEVICE)
    cascade = CascadeInputs(rows_d[PERM], rows_d[KV_START], rows_d[TILE_START, :plan.num_tiles],
                            rows_d[TILE_COUNT, :plan.num_tiles],
                            *alloc_decode_scratch(batch, heads, head_dim, pre_splits, DEVICE))
    q = torch.randn(batch, heads, head_dim, generator=torch.Generator().manual_seed(3)).to(
        DEVICE, dtype)
    seq = torch.tensor(kv.seq_lens, device=DEVICE)
    rows = kv.rows.to(DEVICE)
    k_buf, v_buf = kv.kv_pool.k_buffer[0], kv.kv_pool.v_buffer[0]
    out = torch.full((batch, heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    mid = alloc_decode_scratch(batch, heads, head_dim, splits, DEVICE)
    decode_attention_fwd(q, k_buf, v_buf, out, kv.req_to_token, rows, seq, 0.3, *mid,
                         cascade=cascade)
    ref = decode_attention_reference(q, k_buf, v_buf, kv.req_to_token, rows, seq, 0.3)
    assert rel_err(out, ref) < TOL[dtype]


def test_plan_cascade_groups_tiles_and_drops_loners() -> None:
    # Group 7 has five members (tiles of 2: 2 + 2 + 1), group 3 only one: dropped.
    keys = [7, -1, 7, 3, 7, 7, 7]
    lens = [300, 0, 300, 500, 300, 300, 300]
    plan = plan_cascade(keys, lens, tile_size=2)
    assert plan is not None and plan.num_tiles == 3 and plan.max_prefix == 300
    packed = plan.packed
    assert packed[PERM, :5].tolist() == [0, 2, 4, 5, 6]
    assert packed[KV_START].tolist() == [300, 0, 300, 0, 300, 300, 300]
    assert packed[TILE_START, :3].tolist() == [0, 2, 4]
    assert packed[TILE_COUNT].tolist() == [2, 2, 1, 0, 0, 0, 0]
    assert plan_cascade([3, -1, 4], [500, 0, 600], tile_size=2) is None


def test_shared_prefix_groups_follow_the_tree() -> None:
    alloc = TokenToKVPoolAllocator(4096, 1, "cpu")
    cache = RadixCache(ReqToTokenPool(1, 8, "cpu"), alloc, 1)
    system = list(range(1000, 1300))  # 300 shared tokens
    prompts = {
        "a": system + [1, 2, 3], "b": system + [1, 2, 4], "c": system + [5],
        "d": list(range(2000, 2400)),  # shares nothing
        "e": system[:100] + [9] * 300,  # shares only 100 tokens: too short
    }
    nodes = {}
    for name, ids in prompts.items():
        cache.insert(ids, alloc.alloc(len(ids)))
    for name, ids in prompts.items():
        nodes[name] = cache.match_prefix(ids).last_node
    keys, lens = shared_prefix_groups([nodes[n] for n in "abcde"] + [None], min_len=256)
    # a and b share 302 tokens (a deeper node than c's); c shares 300 with them but its
    # sharers took the deeper node, so it is alone at the 300-token node.
    assert lens[:2] == [302, 302] and keys[0] == keys[1] >= 0
    assert lens[2] == 300 and keys[2] not in (keys[0], -1)
    assert (keys[3], lens[3]) == (-1, 0) and (keys[4], lens[4]) == (-1, 0)
    assert (keys[5], lens[5]) == (-1, 0)
    plan = plan_cascade(keys, lens, tile_size=4)
    assert plan is not None and plan.packed[KV_START].tolist() == [302, 302, 0, 0, 0, 0]


def test_planner_reuses_its_plan_only_while_it_still_holds() -> None:
    """The planner reuses the last plan while the batch's nodes are the same objects. A
    newcomer that splits the batch's shared node (a shorter common prefix) or grows a
    branch below it changes the tree under the cached plan: the reused plan must still
    equal one planned from scratch on the changed tree."""
    alloc = TokenToKVPoolAllocator(8192, 1, "cpu")
    cache = RadixCache(ReqToTokenPool(1, 8, "cpu"), alloc, 1)
    system = list(range(1000, 1400))  # 400 shared tokens
    batch_prompts = [system + [1, 2], system + [3], system + [4, 5, 6]]
    for ids in batch_prompts:
        cache.insert(ids, alloc.alloc(len(ids)))
    nodes = [cache.match_prefix(ids).last_node for ids in batch_prompts]
    planner = CascadePlanner(tile_size=2)
    first = planner.plan(nodes)
    assert first is not None and first.packed[KV_START].tolist() == [400, 400, 400]
    newcomers = [system[:300] + [7] * 50,  # splits the shared node at 300
                 system + [1, 2, 8, 9],  # grows below the first request's node
                 system[:350] + [5] * 10]  # splits again, at 350
    for ids in newcomers:
        cache.insert(ids, alloc.alloc(len(ids)))
        assert [cache.match_prefix(p).last_node for p in batch_prompts] == nodes
        reused = planner.plan(nodes)
        fresh = CascadePlanner(tile_size=2).plan(nodes)
        assert reused is first and fresh is not None
        assert torch.equal(reused.packed, fresh.packed)
        assert (reused.num_tiles, reused.max_prefix) == (fresh.num_tiles, fresh.max_prefix)
    # A changed batch is planned anew.
    assert planner.plan(nodes[:2]) is not first


def decode_batch(kv: SharedKV, q_seed: int, heads: int, head_dim: int, dtype: torch.dtype
                 ) -> tuple[ForwardBatch, torch.Tensor, torch.Tensor, torch.Tensor]:
    batch = len(kv.seq_lens)
    fb = ForwardBatch(
        forward_mode=ForwardMode.DECODE, batch_size=batch,
        input_ids=torch.zeros(batch, dtype=torch.int64, device=DEVICE),
        positions=torch.tensor([n - 1 for n in kv.seq_lens], device=DEVICE),
        req_pool_indices=kv.rows.to(DEVICE), seq_lens=torch.tensor(kv.seq_lens, device=DEVICE),
        out_cache_loc=kv.req_to_token[kv.rows.to(DEVICE), torch.tensor(kv.seq_lens) - 1].long(),
        seq_lens_cpu=kv.seq_lens, req_to_token_pool=kv.req_to_token_pool,
        token_to_kv_pool=kv.kv_pool, attn_backend=None)
    gen = torch.Generator().manual_seed(q_seed)
    kv_heads = kv.kv_pool.k_buffer[0].shape[1]
    q, k, v = (torch.randn(batch, n * head_dim, generator=gen).to(DEVICE, dtype)
               for n in (heads, kv_heads, kv_heads))
    return fb, q, k, v


def test_backend_cascade_eager_and_graph_paths() -> None:
    """The backend with a plan gives the plain backend's output, eagerly and through the
    CUDA-graph metadata (captured with one batch, replayed with another)."""
    heads, kv_heads, head_dim, dtype = 8, 2, 64, torch.float32
    layer = RadixAttention(heads, head_dim, 0.125, kv_heads, layer_id=0)
    groups = [(30, [2, 5, 1]), (0, [7]), (21, [3, 3])]
    kv = SharedKV(groups, kv_heads, head_dim, dtype, seed=5)
    fb, q, k, v = decode_batch(kv, 6, heads, head_dim, dtype)
    plain = TritonAttnBackend(heads, kv_heads, head_dim, DEVICE, max_context_len=128)
    fb.attn_backend = plain
    plain.init_forward_metadata(fb)
    ref = layer(q, k, v, fb, save_kv_cache=False)

    cascade = TritonAttnBackend(heads, kv_heads, head_dim, DEVICE, max_context_len=128)
    fb.cascade_plan = plan_cascade(kv.keys, kv.prefix_lens, cascade.cascade_tile_size)
    fb.cascade_inputs = fb.cascade_plan.packed.to(DEVICE)
    fb.attn_backend = cascade
    cascade.init_forward_metadata(fb)
    assert fb.attn_metadata.cascade is not None
    torch.testing.assert_close(layer(q, k, v, fb, save_kv_cache=False), ref,
                               rtol=TOL[dtype], atol=TOL[dtype])

    cascade.init_cuda_graph_state(max_bs=8)
    other = SharedKV([(25, [1, 1]), (0, [3, 4, 9, 2])], kv_heads, head_dim, dtype, seed=7)
    capture, *_ = decode_batch(other, 8, heads, head_dim, dtype)
    capture.cascade_inputs = plan_cascade(other.keys, other.prefix_lens, 32).packed.to(DEVICE)
    capture.attn_backend = cascade
    cascade.init_forward_metadata_capture_cuda_graph(capture)
    captured = capture.attn_metadata
    cascade.init_forward_metadata_replay_cuda_graph(fb)
    assert fb.attn_metadata is captured and captured.cascade_rows is not None
    assert torch.equal(captured.cascade_rows, fb.cascade_inputs)
    torch.testing.assert_close(layer(q, k, v, fb, save_kv_cache=False), ref,
                               rtol=TOL[dtype], atol=TOL[dtype])


# --- end to end: the engine with the triton backend, cascade on and off ----------------

@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    from tests.model_factory import make_tiny_checkpoint

    return str(make_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama"),
                                    with_tokenizer=False))


def _shared_prefix_prompts() -> list[list[int]]:
    rng = random.Random(0)
    systems = [[rng.randrange(3, 40000) for _ in range(270)] for _ in range(2)]
    prompts = [systems[i % 2] + [rng.randrange(3, 40000) for _ in range(rng.randrange(1, 9))]
               for i in range(7)]
    prompts.append([rng.randrange(3, 40000) for _ in range(40)])  # shares nothing
    return prompts


@pytest.mark.parametrize("kwargs", [
    {},
    {"page_size": 4, "chunked_prefill_size": 128},
    {"enable_cpu_overlap": True},
], ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "plain")
def test_engine_outputs_equal_with_cascade_off(llama_path, monkeypatch, kwargs):
    prompts = _shared_prefix_prompts()
    params = [{"max_new_tokens": 5, "ignore_eos": True, "temperature": 0} if i % 2 else
              {"max_new_tokens": 4, "ignore_eos": True, "temperature": 0.8, "seed": i}
              for i in range(len(prompts))]
    grouped: list[int] = []
    real_plan = CascadePlanner.plan

    def counting_plan(self, last_nodes):
        plan = real_plan(self, last_nodes)
        if plan is not None:
            grouped.append(int((plan.packed[KV_START] > 0).sum()))
        return plan

    monkeypatch.setattr(CascadePlanner, "plan", counting_plan)
    outs = {}
    for off in (False, True):
        # On a GPU: CUDA graphs up to batch 8, so the batch of 8 replays the cascade graph.
        eng = Engine(model_path=llama_path, attention_backend="triton", max_total_tokens=4096,
                     skip_tokenizer_init=True, cuda_graph_max_bs=8, dtype="float32",
                     disable_cascade_attention=off, **kwargs)
        outs[off] = [o["output_ids"] for o in eng.generate(input_ids=prompts,
                                                            sampling_params=params)]
        info = eng.get_server_info()
        assert info.available_tokens + info.evictable_tokens == info.max_total_num_tokens
    assert outs[False] == outs[True]
    # The seven requests on two system prompts decoded as cascade groups.
    assert grouped and max(grouped) == 7
