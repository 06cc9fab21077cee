"""RadixCache and ChunkCache: slot ownership (no leak, no double free), match
correctness, locking, LRU eviction, and the request hooks the scheduler calls."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from radixserve.core.req import Req
from radixserve.core.sampling_params import SamplingParams
from radixserve.mem_cache.allocator import TokenToKVPoolAllocator
from radixserve.mem_cache.chunk_cache import ChunkCache
from radixserve.mem_cache.memory_pool import ReqToTokenPool
from radixserve.mem_cache.radix_cache import RadixCache, TreeNode

# Pages that share leading tokens, so a page-granular match must stop on the boundary.
PAGES = [(0, 0, 0, 0), (0, 0, 0, 1), (1, 2, 3, 0)]


def free_slots(alloc: TokenToKVPoolAllocator) -> set[int]:
    ps = alloc.page_size
    return {p * ps + i for p in alloc.free_pages for i in range(ps)}


def all_handable_slots(alloc: TokenToKVPoolAllocator) -> set[int]:
    return set(range(alloc.page_size, (alloc.num_pages + 1) * alloc.page_size))


def path_key(node: TreeNode) -> list[int]:
    parts: list[list[int]] = []
    while node.parent is not None:
        parts.append(node.key)
        node = node.parent
    return [t for part in reversed(parts) for t in part]


def keys_for(page_size: int) -> st.SearchStrategy[list[int]]:
    if page_size == 1:
        return st.lists(st.integers(0, 2), min_size=1, max_size=10)
    return st.lists(st.sampled_from(PAGES), min_size=1, max_size=4).map(
        lambda pages: [t for p in pages for t in p])


# --- the tree alone ------------------------------------------------------------------


class TreeMachine(RuleBasedStateMachine):
    """Random insert/match/lock/unlock/evict against a model of what the tree holds:
    `model[prefix]` is the slots of prefix's last page (prefix ends on a page boundary)."""

    page_size = 1
    capacity = 48

    def __init__(self) -> None:
        super().__init__()
        self.alloc = TokenToKVPoolAllocator(self.capacity, self.page_size, "cpu")
        self.cache = RadixCache(ReqToTokenPool(1, 8, "cpu"), self.alloc, self.page_size)
        self.model: dict[tuple[int, ...], list[int]] = {}
        self.locks: list[tuple[TreeNode, list[int]]] = []

    def page_prefixes(self, key: list[int]) -> list[tuple[int, ...]]:
        ps = self.page_size
        return [tuple(key[:end]) for end in range(ps, len(key) + 1, ps)]

    def cached_len(self, key: list[int]) -> int:
        n = 0
        for prefix in self.page_prefixes(key):
            if prefix not in self.model:
                break
            n = len(prefix)
        return n

    def check_match(self, query: list[int]) -> tuple[TreeNode, int]:
        res = self.cache.match_prefix(query)
        m = len(res.device_indices)
        assert m == self.cached_len(query)
        assert path_key(res.last_node) == query[:m]
        expected = [s for prefix in self.page_prefixes(query[:m]) for s in self.model[prefix]]
        assert res.device_indices.tolist() == expected
        return res.last_node, m

    @rule(data=st.data())
    def insert(self, data: st.DataObject) -> None:
        key = data.draw(keys_for(self.page_size))
        slots = self.alloc.alloc(len(key))
        if slots is None:
            self.do_evict(len(key))
            slots = self.alloc.alloc(len(key))
            if slots is None:
                return
        expected = self.cached_len(key)
        present = self.cache.insert(key, slots)
        assert present == expected
        self.alloc.free(slots[:present])
        for prefix in self.page_prefixes(key)[present // self.page_size:]:
            end = len(prefix)
            self.model[prefix] = slots[end - self.page_size:end].tolist()

    @rule(data=st.data(), extra=st.lists(st.integers(0, 2), max_size=3))
    def match(self, data: st.DataObject, extra: list[int]) -> None:
        self.check_match(data.draw(keys_for(self.page_size)) + extra)

    @rule(data=st.data())
    def lock(self, data: st.DataObject) -> None:
        query = data.draw(keys_for(self.page_size))
        node, m = self.check_match(query)
        before = self.cache.evictable_size()
        assert self.cache.inc_lock_ref(node) == self.cache.evictable_size() - before
        self.locks.append((node, query[:m]))

    @precondition(lambda self: self.locks)
    @rule(i=st.integers(0, 100))
    def unlock(self, i: int) -> None:
        node, _ = self.locks.pop(i % len(self.locks))
        before = self.cache.evictable_size()
        assert self.cache.dec_lock_ref(node) == self.cache.evictable_size() - before

    @rule(n=st.integers(0, 60))
    def evict(self, n: int) -> None:
        self.do_evict(n)

    def do_evict(self, n: int) -> None:
        before = set(self.cache.all_slots().tolist())
        freed = self.cache.evict(n)
        after = set(self.cache.all_slots().tolist())
        assert after <= before and len(before - after) == freed
        assert freed >= n or self.cache.evictable_size() == 0
        self.model = {k: v for k, v in self.model.items() if set(v) <= after}
        for key in self.model:  # leaves go first: a surviving node keeps its ancestors
            assert all(p in self.model for p in self.page_prefixes(list(key)))
        for _, key in self.locks:
            assert self.cached_len(key) == len(key)

    @invariant()
    def slots_accounted(self) -> None:
        tree = self.cache.all_slots().tolist()
        assert len(tree) == len(set(tree)) == self.cache.total_size()
        assert set(tree) == {s for v in self.model.values() for s in v}
        free = free_slots(self.alloc)
        assert not free & set(tree)
        assert free | set(tree) == all_handable_slots(self.alloc)

    @invariant()
    def sizes_consistent(self) -> None:
        c = self.cache
        assert c.evictable_size() + c.protected_size() == c.total_size()
        locked = {p for _, key in self.locks for p in self.page_prefixes(key)}
        assert c.protected_size() == len(locked) * self.page_size

    def teardown(self) -> None:
        for node, _ in self.locks:
            self.cache.dec_lock_ref(node)
        self.cache.reset()
        assert self.alloc.available_size() == self.alloc.size


class PagedTreeMachine(TreeMachine):
    page_size = 4
    capacity = 96


_tree_settings = settings(max_examples=120, stateful_step_count=30, deadline=None)
TestTreePage1 = TreeMachine.TestCase
TestTreePage1.settings = _tree_settings
TestTreePage4 = PagedTreeMachine.TestCase
TestTreePage4.settings = _tree_settings


def test_split_keeps_lock_on_original_node() -> None:
    alloc = TokenToKVPoolAllocator(32, 1, "cpu")
    cache = RadixCache(ReqToTokenPool(1, 8, "cpu"), alloc, 1)
    cache.insert([1, 2, 3, 4], alloc.alloc(4))
    node = cache.match_prefix([1, 2, 3, 4]).last_node
    cache.inc_lock_ref(node)
    upper = cache.match_prefix([1, 2, 9]).last_node  # splits [1,2,3,4] after 2 tokens
    assert upper.lock_ref == 1 and node.parent is upper
    assert cache.evict(100) == 0
    cache.dec_lock_ref(node)
    assert (cache.evictable_size(), cache.protected_size()) == (4, 0)
    assert cache.evict(1) == 2  # whole leaf [3,4]; the parent is next in line
    assert cache.match_prefix([1, 2, 3]).device_indices.numel() == 2


def test_evicts_least_recently_used_first() -> None:
    alloc = TokenToKVPoolAllocator(32, 1, "cpu")
    cache = RadixCache(ReqToTokenPool(1, 8, "cpu"), alloc, 1)
    cache.insert([1, 1], alloc.alloc(2))
    cache.insert([2, 2], alloc.alloc(2))
    cache.match_prefix([1, 1])
    cache.evict(1)
    assert len(cache.match_prefix([1, 1]).device_indices) == 2
    assert len(cache.match_prefix([2, 2]).device_indices) == 0


# --- requests ------------------------------------------------------------------------


class Sim:
    """A minimal scheduler: admits requests, prefills in chunks, decodes, and checks after
    every step that each page has exactly one owner and that every request's row points
    at KV computed for exactly its own tokens (`content[slot]` = the prefix it encodes)."""

    def __init__(self, cache_cls: type, page_size: int, kv_size: int = 256) -> None:
        self.alloc = TokenToKVPoolAllocator(kv_size, page_size, "cpu")
        self.pool = ReqToTokenPool(4, 96, "cpu")
        self.cache = cache_cls(self.pool, self.alloc, page_size)
        self.content: dict[int, tuple[int, ...]] = {}
        self.running: list[Req] = []

    def admit(self, req: Req) -> None:
        req.init_next_round_input(self.cache)
        req.fill_ids = req.origin_input_ids[:len(req.prefix_indices)]
        self.cache.inc_lock_ref(req.last_node)
        req.req_pool_idx = self.pool.alloc()
        assert req.req_pool_idx is not None
        self.pool.write(req.req_pool_idx, 0, req.prefix_indices)
        req.kv_committed_len = len(req.prefix_indices)
        self.running.append(req)

    def compute(self, req: Req, n: int) -> None:
        """Run the forward for the next n tokens of req.all_ids."""
        start = req.kv_committed_len
        row = self.pool.req_to_token[req.req_pool_idx]
        last_loc = int(row[start - 1]) if start else -1
        slots = self.alloc.alloc_for_seq(last_loc, start, n)
        if slots is None:
            self.cache.evict(n + self.alloc.page_size)
            slots = self.alloc.alloc_for_seq(last_loc, start, n)
        assert slots is not None, "test pool too small"
        self.pool.write(req.req_pool_idx, start, slots)
        for i, s in enumerate(slots.tolist()):
            self.content[s] = tuple(req.all_ids[:start + i + 1])
        req.kv_committed_len += n

    def step(self, req: Req, chunk: int, max_new: int) -> None:
        prompt_len = len(req.origin_input_ids)
        if req.kv_committed_len < prompt_len:
            n = min(chunk, prompt_len - req.kv_committed_len)
            req.fill_ids = req.origin_input_ids[:req.kv_committed_len + n]
            self.compute(req, n)
            if req.kv_committed_len < prompt_len:
                self.cache.cache_unfinished_req(req)
                assert len(req.prefix_indices) == req.kv_committed_len
                return
        else:
            self.compute(req, 1)
        req.output_ids.append((req.seqlen * 7 + len(req.rid)) % 3)
        if len(req.output_ids) >= max_new:
            self.running.remove(req)
            self.cache.cache_finished_req(req)

    def check(self) -> None:
        ps = self.alloc.page_size
        tree = self.cache.all_slots().tolist()
        owners = [set(self.alloc.free_pages), {s // ps for s in tree}]
        assert len(tree) == len(set(tree)) and len(owners[1]) * ps == len(tree)
        for req in self.running:
            row = self.pool.req_to_token[req.req_pool_idx, :req.kv_committed_len].tolist()
            for i, s in enumerate(row):
                assert self.content[s] == tuple(req.all_ids[:i + 1])
            tree_len = len(req.prefix_indices) - len(req.prefix_indices) % ps
            if isinstance(self.cache, ChunkCache):
                tree_len = 0
            assert row[:tree_len] == req.prefix_indices[:tree_len].tolist()
            assert set(row[:tree_len]) <= set(tree)
            owners.append({s // ps for s in row[tree_len:]})
        assert sum(map(len, owners)) == self.alloc.num_pages
        assert set().union(*owners) == set(range(1, self.alloc.num_pages + 1))
        c = self.cache
        assert c.evictable_size() + c.protected_size() == c.total_size()

    def finish_all_and_check_empty(self) -> None:
        assert not self.running
        assert self.pool.available_size() == self.pool.size
        self.check()
        self.cache.reset()
        assert self.alloc.available_size() == self.alloc.size


def make_req(rid: str, prompt: list[int]) -> Req:
    return Req(rid, prompt, SamplingParams())


BASES = [[], [1, 2, 0, 1, 2, 0, 1, 2, 0], [1, 2, 0, 1, 2, 0, 1, 1, 1, 1, 1]]


@settings(max_examples=100, deadline=None)
@given(page_size=st.sampled_from([1, 4]), chunk=st.integers(2, 9),
       use_radix=st.booleans(), max_new=st.integers(1, 5),
       prompts=st.lists(st.tuples(st.sampled_from(BASES),
                                  st.lists(st.integers(0, 5), min_size=1, max_size=8)),
                        min_size=1, max_size=8),
       interleave=st.lists(st.integers(0, 2), max_size=60))
def test_requests_never_leak(page_size: int, chunk: int, use_radix: bool, max_new: int,
                             prompts: list[tuple[list[int], list[int]]],
                             interleave: list[int]) -> None:
    # Small enough that admitting requests must evict cached prefixes.
    sim = Sim(RadixCache if use_radix else ChunkCache, page_size, kv_size=48)
    waiting = [make_req(f"r{i}", base + tail) for i, (base, tail) in enumerate(prompts)]
    picks = iter(interleave)
    while waiting or sim.running:
        if waiting and len(sim.running) < 2:
            sim.admit(waiting.pop(0))
        else:
            pick = next(picks, 0) % len(sim.running)
            sim.step(sim.running[pick], chunk, max_new)
        sim.check()
    sim.finish_all_and_check_empty()


def test_second_request_reuses_shared_prefix() -> None:
    for page_size in (1, 4):
        sim = Sim(RadixCache, page_size)
        shared = list(range(10, 23))  # 13 tokens: not page-aligned
        a, b = make_req("a", shared + [1, 2]), make_req("b", shared + [3])
        sim.admit(a)
        assert len(a.prefix_indices) == 0
        while sim.running:
            sim.step(a, chunk=100, max_new=3)
        sim.admit(b)
        # a cached prompt + 2 generated tokens with KV; b shares 13 tokens of it.
        assert len(b.prefix_indices) == 13 - 13 % page_size
        assert sim.cache.protected_size() == len(b.prefix_indices)
        while sim.running:
            sim.step(b, chunk=100, max_new=3)
            sim.check()
        assert sim.cache.protected_size() == 0
        sim.finish_all_and_check_empty()


def test_concurrent_identical_prompts_free_duplicates() -> None:
    """Both miss the cache and compute the same KV; the second to be cached must free
    its copy (in cache_unfinished_req and in cache_finished_req)."""
    for page_size in (1, 4):
        sim = Sim(RadixCache, page_size)
        prompt = list(range(30, 41))
        a, b = make_req("a", prompt), make_req("b", prompt)
        sim.admit(a)
        sim.admit(b)
        for _ in range(3):  # chunk, last chunk + first token, decode + finish
            sim.step(a, chunk=6, max_new=2)
            sim.step(b, chunk=6, max_new=2)
            sim.check()
        assert not sim.running
        assert sim.cache.total_size() == 12 - 12 % page_size  # prompt + 1 decoded token
        sim.finish_all_and_check_empty()


def test_finishing_an_unadmitted_request_is_a_no_op() -> None:
    for cache_cls in (RadixCache, ChunkCache):
        sim = Sim(cache_cls, 1)
        req = make_req("x", [1, 2, 3])
        sim.cache.cache_finished_req(req)
        sim.finish_all_and_check_empty()


def test_chunk_cache_does_not_reuse() -> None:
    sim = Sim(ChunkCache, 4)
    for rid in ("a", "b"):
        req = make_req(rid, list(range(20)))
        sim.admit(req)
        assert len(req.prefix_indices) == 0
        while sim.running:
            sim.step(req, chunk=7, max_new=2)
            sim.check()
    assert sim.cache.total_size() == 0
    sim.finish_all_and_check_empty()


def test_finish_before_first_forward_keeps_tree_prefix() -> None:
    """A request that ends right after admission may have committed less KV than it
    matched; the tree's slots under its prefix must stay with the tree."""
    for committed in (0, 6):
        sim = Sim(RadixCache, 4)
        first = make_req("a", list(range(13)))
        sim.admit(first)
        while sim.running:
            sim.step(first, chunk=100, max_new=1)
        second = make_req("b", list(range(13)))
        sim.admit(second)
        assert len(second.prefix_indices) == 12
        second.kv_committed_len = committed
        sim.running.remove(second)
        sim.cache.cache_finished_req(second)
        assert sim.cache.total_size() == 12
        sim.finish_all_and_check_empty()
