"""Which waiting requests run next: queue order (fcfs / lpm / dfs-weight) and the
token budgets that decide how many of them a prefill batch admits."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from radixserve.core.req import Req

# Reordering the queue needs a prefix match per request; past this many waiting
# requests it stops being cheap, and the queue is served first come, first served.
MAX_REORDER_QUEUE = 128
# Admission assumes a request may grow by at most this many tokens when it estimates
# what the running batch will need (a long max_new_tokens should not block admission).
CLIP_MAX_NEW_TOKENS = 4096


class SchedulePolicy:
    def __init__(self, policy: str, tree_cache: Any, radix_enabled: bool) -> None:
        self.policy = policy if radix_enabled else "fcfs"
        self.tree_cache = tree_cache

    def order(self, waiting: list[Req]) -> list[Req]:
        """Return the queue in the order in which admission should try it."""
        if self.policy == "fcfs" or len(waiting) > MAX_REORDER_QUEUE:
            return list(waiting)
        for req in waiting:
            req.init_next_round_input(self.tree_cache)
        if self.policy == "lpm":
            # Stable sort: among equal matches the oldest request goes first.
            return sorted(waiting, key=lambda r: -len(r.prefix_indices))
        return self._dfs_weight(waiting)

    def _dfs_weight(self, waiting: list[Req]) -> list[Req]:
        """SGLang's cache-aware order: walk the radix tree depth first, visiting the
        subtree with the most waiting requests first, so requests that share a prefix
        run back to back and the shared part stays cached."""
        by_node: dict[Any, list[Req]] = defaultdict(list)
        for req in waiting:
            by_node[req.last_node].append(req)
        weight: dict[Any, int] = defaultdict(int)
        for node, reqs in by_node.items():
            n = node
            while n is not None:
                weight[n] += len(reqs)
                n = n.parent
        root = self.tree_cache.root_node
        ordered: list[Req] = []
        stack = [root]
        while stack:
            node = stack.pop()
            ordered.extend(by_node.get(node, []))
            children = [c for c in node.children.values() if weight.get(c, 0) > 0]
            # Pushed lightest first so the heaviest subtree is popped next.
            stack.extend(sorted(children, key=lambda c: weight[c]))
        seen = {id(r) for r in ordered}
        ordered.extend(r for r in waiting if id(r) not in seen)
        return ordered


@dataclass
class PrefillBudget:
    """What the next prefill batch may still take, in tokens."""

    rem_total_tokens: int  # KV the pool can still give, after running requests' growth
    rem_input_tokens: int  # --max-prefill-tokens
    rem_chunk_tokens: int | None  # --chunked-prefill-size (None: no chunking)
    page_size: int

    def fits(self, req: Req, new_token_ratio: float) -> bool:
        grow = min(req.sampling_params.max_new_tokens - len(req.output_ids), CLIP_MAX_NEW_TOKENS)
        need = req.extend_input_len + int(grow * new_token_ratio)
        return need <= self.rem_total_tokens

    def chunk_len(self, extend_len: int) -> int:
        """How many of `extend_len` new tokens go into this batch (0: none fit)."""
        if self.rem_chunk_tokens is None or extend_len <= self.rem_chunk_tokens:
            return min(extend_len, self.rem_input_tokens) if self.rem_input_tokens > 0 else 0
        n = min(self.rem_chunk_tokens, self.rem_input_tokens)
        # Chunks end on a page boundary so that every page is owned by one holder.
        return n - n % self.page_size

    def take(self, req: Req, extend_len: int, new_token_ratio: float) -> None:
        grow = min(req.sampling_params.max_new_tokens - len(req.output_ids), CLIP_MAX_NEW_TOKENS)
        self.rem_total_tokens -= extend_len + int(grow * new_token_ratio)
        self.rem_input_tokens -= extend_len
        if self.rem_chunk_tokens is not None:
            self.rem_chunk_tokens -= extend_len
