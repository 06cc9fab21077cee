"""GrammarManager: the scheduler's one door into structured output.

Compiling a grammar takes milliseconds to seconds, so it runs on a thread pool (xgrammar
releases the GIL): a request waits in the queue until its grammar is ready while the
others keep running. Compiled grammars are cached by (kind, text), so a schema sent again
compiles once.

Per request the flow is: `add_request` starts the compile → `collect_compiled` (each
step) gives ready requests a matcher and reports failed compiles → `is_ready` gates
admission → the sampler masks logits with the matchers (SamplingBatchInfo) →
`accept_tokens` advances the matchers with the sampled token and says when the grammar
ended the request.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from radixserve.constrained.xgrammar_backend import (GrammarError, GrammarKey, XGrammarBackend,
                                                     accept_tokens, grammar_key)
from radixserve.core.req import Req

BACKENDS = ("xgrammar", "none")
# Distinct grammars kept compiled; a server sees few distinct schemas, but a client that
# sends a fresh one per request must not grow memory without bound.
_CACHE_SIZE = 1024


class ReqGrammar:
    """One request's grammar: a compile future until ready, then an xgrammar matcher."""

    def __init__(self, key: GrammarKey, future: Future, stop_token_ids: list[int]) -> None:
        self.key = key
        self.future = future
        self.stop_token_ids = stop_token_ids
        self.matcher: Any = None

    def finish_reason(self, token_id: int, accepted: bool) -> dict[str, Any] | None:
        """After the matcher was given the sampled token: a finish reason when the
        grammar ended the request (or refused the token)."""
        if not accepted:
            # Only when nothing was allowed (e.g. min_new_tokens blocked the EOS that the
            # finished grammar requires) and the sampler had to pick a masked token.
            return {"type": "abort", "message":
                    f"token {token_id} is not allowed by the request's {self.key[0]}"}
        if self.matcher.is_terminated():
            # The matcher terminates only on accepting a stop token (EOS).
            return {"type": "stop", "matched": token_id}
        return None


class GrammarManager:
    def __init__(self, grammar_backend: str, tokenizer: Any, vocab_size: int,
                 eos_token_ids: set[int]) -> None:
        if grammar_backend not in BACKENDS:
            raise ValueError(f"grammar_backend must be one of {BACKENDS}, got "
                             f"{grammar_backend!r}")
        self.enabled = grammar_backend != "none"
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        threads = max(1, min(4, os.cpu_count() or 1))
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="grammar")
        self._threads = threads
        # Built on first use, in a pool thread: servers that never see a grammar do not
        # pay for the tokenizer scan.
        self._backend: XGrammarBackend | None = None
        self._backend_lock = threading.Lock()
        self._cache: OrderedDict[GrammarKey, Future] = OrderedDict()
        self._pending: list[Req] = []
        # Under TP, rank 0's `compiled_rids()` at the start of each step: only compiles
        # listed there count as done (followers wait for them), so that every rank
        # admits the same requests whatever its own threads' timing.
        self.ready_rids: set[str] | None = None

    # --- scheduler hooks ------------------------------------------------------------

    def add_request(self, req: Req) -> None:
        """Start compiling the request's grammar, if it has one.

        Raises ValueError when it has one but structured output is unavailable."""
        key = grammar_key(req.sampling_params)
        if key is None:
            return
        if not self.enabled:
            raise ValueError(f"{key[0]} needs a grammar backend, but the server runs with "
                             f"--grammar-backend none")
        if self.tokenizer is None:
            raise ValueError(f"{key[0]} needs the tokenizer, but skip_tokenizer_init is set")
        stops = set(self.eos_token_ids) | set(req.sampling_params.stop_token_ids or ())
        req.grammar = ReqGrammar(key, self._compile_async(key), sorted(stops))
        self._pending.append(req)

    def collect_compiled(self) -> list[tuple[Req, dict[str, Any]]]:
        """Give each request whose compile finished a matcher; return those whose compile
        failed, with the finish reason the scheduler must end them with."""
        failed: list[tuple[Req, dict[str, Any]]] = []
        still: list[Req] = []
        for req in self._pending:
            grammar = req.grammar
            if req.finished():  # aborted while compiling
                continue
            done = (grammar.future.done() if self.ready_rids is None
                    else req.rid in self.ready_rids)
            if not done:
                still.append(req)
                continue
            try:
                grammar.matcher = XGrammarBackend.new_matcher(grammar.future.result(),
                                                              grammar.stop_token_ids)
            except GrammarError as e:
                failed.append((req, {"type": "abort", "status_code": 400, "message": str(e),
                                     "param": grammar.key[0]}))
            except Exception as e:  # noqa: BLE001 -- our fault, but only this request's
                failed.append((req, {"type": "abort", "status_code": 500,
                                     "message": f"grammar backend failed: {e!r}"}))
        self._pending = still
        return failed

    def compiled_rids(self) -> list[str]:
        """Requests whose grammar compile has finished (what TP rank 0 broadcasts)."""
        return [r.rid for r in self._pending if r.grammar.future.done()]

    @staticmethod
    def is_ready(req: Req) -> bool:
        """False while the request's grammar compiles (or failed): do not admit it yet."""
        return req.grammar is None or req.grammar.matcher is not None

    @staticmethod
    def accept_tokens(reqs: list[Req], token_ids: list[int]) -> list[dict[str, Any] | None]:
        """Feed each grammar request its newly sampled token (all in one call, on
        xgrammar's threads); per request, a finish reason when its grammar ended it."""
        if not reqs:
            return []
        accepted = accept_tokens([r.grammar.matcher for r in reqs], token_ids)
        return [r.grammar.finish_reason(t, ok) for r, t, ok in zip(reqs, token_ids, accepted)]

    # --- compiling ------------------------------------------------------------------

    def _compile_async(self, key: GrammarKey) -> Future:
        future = self._cache.get(key)
        if future is not None:
            self._cache.move_to_end(key)
            return future
        future = self._pool.submit(self._compile, key)
        self._cache[key] = future
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return future

    def _compile(self, key: GrammarKey) -> Any:
        with self._backend_lock:
            if self._backend is None:
                self._backend = XGrammarBackend(self.tokenizer, self.vocab_size,
                                                self.eos_token_ids, self._threads)
        return self._backend.compile(key)
