"""NGRAM drafting: continue the sequence the way it went before.

Two sources, no model. First the request's own tokens (prompt and output): the most
recent earlier place whose preceding tokens match the longest suffix of the sequence
(between the min and max match window) proposes what followed it there; text that
quotes its prompt back (summaries, edits, code) is drafted this way. Then a trie shared
across requests, holding every window of up to branch_length tokens seen so far, for
continuations that another request has produced.
"""

from __future__ import annotations

import weakref

from radixserve.configs.speculative_config import SpeculativeConfig
from radixserve.core.req import Req
from radixserve.core.schedule_batch import ScheduleBatch

# Earlier occurrences of the last token examined per lookup: the most recent ones,
# which bounds the host time of a lookup on a long sequence.
_MAX_CANDIDATES = 64


class NgramTrie:
    """Windows of token sequences, with how often each continuation followed."""

    def __init__(self, depth: int, capacity: int) -> None:
        self.depth = depth
        self.capacity = capacity
        self.root: dict[int, list] = {}  # token -> [count, children]
        self.num_nodes = 0

    def insert(self, tokens: list[int], start: int) -> None:
        """Insert every window of `tokens` that ends at or after position `start`."""
        if self.num_nodes >= self.capacity:
            # Dropped whole rather than pruned: it is rebuilt from the traffic that follows.
            self.root, self.num_nodes = {}, 0
        n = len(tokens)
        for s in range(max(0, start - self.depth + 1), n):
            level = self.root
            for t in tokens[s:min(n, s + self.depth)]:
                node = level.get(t)
                if node is None:
                    node = level[t] = [0, {}]
                    self.num_nodes += 1
                node[0] += 1
                level = node[1]

    def continuation(self, suffix: list[int], k: int) -> list[int]:
        """The most frequent path of up to k tokens after `suffix`, if the trie has it."""
        level = self.root
        for t in suffix:
            node = level.get(t)
            if node is None:
                return []
            level = node[1]
        out: list[int] = []
        while level and len(out) < k:
            t, node = max(level.items(), key=lambda kv: kv[1][0])
            out.append(t)
            level = node[1]
        return out


class NgramDrafter:
    def __init__(self, config: SpeculativeConfig) -> None:
        self.min_window = config.ngram_min_match_window_size
        self.max_window = config.ngram_max_match_window_size
        depth = max(config.ngram_branch_length, self.max_window + 1)
        self.trie = NgramTrie(depth, config.ngram_capacity)
        # Per request: how many of its tokens the trie holds already.
        self._inserted: weakref.WeakKeyDictionary[Req, int] = weakref.WeakKeyDictionary()

    def on_extend(self, batch: ScheduleBatch) -> None:
        """Nothing to mirror: the lookup reads the requests' tokens."""

    def propose(self, reqs: list[Req], budgets: list[int]) -> list[list[int]]:
        out = []
        for req, k in zip(reqs, budgets):
            tokens = req.all_ids
            self.trie.insert(tokens, self._inserted.get(req, 0))
            self._inserted[req] = len(tokens)
            out.append(self.lookup(tokens, k) if k > 0 else [])
        return out

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        own = self._own_history(tokens, k)
        if own:
            return own
        for w in range(min(self.max_window, len(tokens)), self.min_window - 1, -1):
            found = self.trie.continuation(tokens[len(tokens) - w:], k)
            if found:
                return found
        return []

    def _own_history(self, tokens: list[int], k: int) -> list[int]:
        """What followed the latest earlier match of the longest suffix."""
        n = len(tokens)
        last = tokens[-1]
        best_len, best_end, seen = 0, -1, 0
        for q in range(n - 2, -1, -1):
            if tokens[q] != last:
                continue
            seen += 1
            m = 1
            while m < self.max_window and q - m >= 0 and tokens[q - m] == tokens[n - 1 - m]:
                m += 1
            if m > best_len:
                best_len, best_end = m, q
                if m == self.max_window:
                    break
            if seen >= _MAX_CANDIDATES:
                break
        if best_len < self.min_window:
            return []
        return tokens[best_end + 1:best_end + 1 + k]

    def on_verified(self, reqs: list[Req], drafts: list[list[int]],
                    accepted: list[int]) -> None:
        """The accepted tokens enter the trie at the next lookup, with the rest."""
