"""The decode server's role: pre-allocate a request's KV, have its prefill server write
the prompt's pages there, then decode it like any other request.

A request's life on this side:

  queued    waits for KV room for its prompt (evicting cached prefixes if needed)
  claimed   its pages are allocated and announced to the prefill server's bootstrap
            server (`/pd/claim`); the receiver thread polls `/pd/status` for the room
  arrived   the prefill side wrote the pages and sent the first token: the prompt enters
            the radix cache, the request joins the running batch

A request that fails (no room in time, the prefill side failed or vanished, no KV in
time, aborted) gives its pages back uncached and ends with a 5xx reason; the prefill
side is told to free its half.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from radixserve.configs.disaggregation_config import DisaggregationConfig
from radixserve.core.req import Req
from radixserve.disaggregation import bootstrap
from radixserve.disaggregation.bootstrap import BootstrapError
from radixserve.disaggregation.kv_layout import KVBuffers
from radixserve.disaggregation.roles import (Finish, KVHost, Reason, check_paired, failed,
                                             pages_of)
from radixserve.disaggregation.transfer import MooncakeTransfer

logger = logging.getLogger(__name__)

# Consecutive failed status polls after which a prefill server counts as gone.
_UNREACHABLE_AFTER = 3
# How long one status poll may wait on the prefill side for a room to end.
_STATUS_WAIT_S = 0.05


@dataclass
class _Incoming:
    req: Req
    deadline: float
    pair_deadline: float = 0.0  # by when the prefill side must have the request too
    num_tokens: int = 0
    pages: list[int] = field(default_factory=list)

    @property
    def peer(self) -> tuple[str, int]:
        return str(self.req.bootstrap_host), int(self.req.bootstrap_port or 0)


class DecodeRole:
    def __init__(self, config: DisaggregationConfig, kv: KVHost, kv_pool: object,
                 page_size: int, finish: Finish, emit: Callable[[Req], None],
                 check_finished: Callable[[Req, int], Reason | None]) -> None:
        self.config = config
        self.kv = kv
        self.page_size = page_size
        self._finish = finish
        self._emit = emit
        self._check_finished = check_finished
        self.bufs = KVBuffers.from_pool(kv_pool, page_size)
        self.transfer = MooncakeTransfer(config.host, config.ib_device)
        self.transfer.register(self.bufs)
        self._queue: deque[_Incoming] = deque()
        self._claimed: dict[int, _Incoming] = {}
        self._wake = threading.Event()
        self._receiver = _Receiver(self.transfer.session_id, self.bufs, self._wake)

    def check_request(self, req: Req) -> None:
        check_paired(req, "decode")
        problem = None
        if req.return_logprob:
            problem = "return_logprob is not supported on a decode server yet"
        elif _has_grammar(req):
            problem = "json_schema, regex and ebnf are not supported on a decode server yet"
        if problem is not None:
            self._receiver.abort(_Incoming(req, 0.0).peer, int(req.bootstrap_room or 0),
                                 f"the decode server refused the request: {problem}")
            raise ValueError(problem)

    def enqueue(self, req: Req, waiting: list[Req]) -> None:
        self._queue.append(_Incoming(req, time.monotonic() + self.config.waiting_timeout_s))

    def decodes_here(self, req: Req) -> bool:
        return True  # a retracted request is prefilled again here, then decodes here

    def poll(self) -> list[Req]:
        """Allocate for queued requests, take in the rooms whose KV arrived; returns the
        requests that join the running batch."""
        now = time.monotonic()
        self._allocate_queued(now)
        ready = []
        for room, first_token, error in self._receiver.drain():
            inc = self._claimed.pop(room, None)
            if inc is None:
                continue
            if error is not None:
                self._fail(inc, error, tell_prefill=False)
            elif (req := self._arrived(inc, int(first_token))) is not None:
                ready.append(req)
        for room, inc in list(self._claimed.items()):
            if inc.req.to_abort:
                del self._claimed[room]
                self._fail(inc, "aborted by the client")
            elif now > inc.pair_deadline and not self._receiver.paired(room):
                del self._claimed[room]
                host, port = inc.peer
                self._fail(inc, f"the prefill server ({host}:{port}) has not received the "
                                f"request of bootstrap_room {room} within "
                                f"{self.config.bootstrap_timeout_s:g} s "
                                f"(--disaggregation-bootstrap-timeout)")
            elif now > inc.deadline:
                del self._claimed[room]
                host, port = inc.peer
                self._fail(inc, f"the KV of bootstrap_room {room} did not arrive from the "
                                f"prefill server ({host}:{port}) within "
                                f"{self.config.waiting_timeout_s:g} s "
                                f"(--disaggregation-waiting-timeout)")
        return ready

    def _allocate_queued(self, now: float) -> None:
        while self._queue:
            inc = self._queue[0]
            if inc.req.to_abort:
                self._queue.popleft()
                self._fail(inc, "aborted by the client")
            elif self._allocate(inc):
                self._queue.popleft()
                inc.deadline = now + self.config.waiting_timeout_s
                inc.pair_deadline = now + self.config.bootstrap_timeout_s
                self._claimed[int(inc.req.bootstrap_room or 0)] = inc
                self._receiver.claim(inc.peer, int(inc.req.bootstrap_room or 0), inc.pages)
            elif now > inc.deadline:
                self._queue.popleft()
                self._fail(inc, f"no KV room on the decode server for the "
                                f"{len(inc.req.origin_input_ids)}-token prompt within "
                                f"{self.config.waiting_timeout_s:g} s", status_code=503)
            else:
                return  # first come, first served: the rest wait behind it

    def _allocate(self, inc: _Incoming) -> bool:
        req = inc.req
        root = self.kv.tree_cache.match_prefix([])  # no prefix: every page is sent
        req.prefix_indices, req.last_node = root.device_indices, root.last_node
        if not self.kv.claim_row(req):
            return False
        n = len(req.origin_input_ids)
        slots = self.kv.alloc_for_req(req, n)
        if slots is None:
            self.kv.release_row(req)
            return False
        inc.num_tokens, inc.pages = n, pages_of(slots, self.page_size)
        return True

    def _arrived(self, inc: _Incoming, first_token: int) -> Req | None:
        """The prompt's KV is in place: cache it, then continue from the first token."""
        req = inc.req
        req.fill_ids = list(req.origin_input_ids)
        req.kv_committed_len = inc.num_tokens
        req.input_logprobs_done = True
        self.kv.cache_unfinished(req)
        req.output_ids = [first_token]
        req.num_resolved = 1
        reason = self._check_finished(req, 0)
        if reason is not None:
            self._finish(req, reason)
            return None
        self._emit(req)
        return req

    def _fail(self, inc: _Incoming, message: str, status_code: int = 500,
              tell_prefill: bool = True) -> None:
        logger.warning("decode: %s", message)
        if tell_prefill:
            self._receiver.abort(inc.peer, int(inc.req.bootstrap_room or 0), message)
        self.kv.discard(inc.req, inc.num_tokens)
        reason = failed(message, status_code)
        if inc.req.to_abort:
            reason = {"type": "abort", "message": message}
        self._finish(inc.req, reason)

    def has_work(self) -> bool:
        return bool(self._queue or self._claimed)

    def num_held(self) -> int:
        return len(self._queue) + len(self._claimed)

    def idle_wait(self, timeout_s: float) -> None:
        self._wake.wait(timeout_s)
        self._wake.clear()


def _has_grammar(req: Req) -> bool:
    sp = req.sampling_params
    return any(getattr(sp, name, None) is not None for name in ("json_schema", "regex", "ebnf"))


class _Receiver:
    """The decode side's bootstrap client, on threads of its own so that no HTTP call
    runs in the scheduler's step: one announces claims (and aborts), one polls the
    prefill servers for the rooms that ended."""

    def __init__(self, session_id: str, bufs: KVBuffers, wake: threading.Event) -> None:
        self.session_id = session_id
        self.bufs = bufs
        self._wake = wake
        self._jobs: queue.Queue[tuple[str, tuple[str, int], int, Any]] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting: dict[tuple[str, int], set[int]] = {}
        self._results: deque[tuple[int, int | None, str | None]] = deque()
        self._layouts: dict[tuple[str, int], str | None] = {}  # peer -> mismatch, if any
        self._paired: set[int] = set()
        threading.Thread(target=self._announce_loop, name="pd-claim", daemon=True).start()
        threading.Thread(target=self._status_loop, name="pd-status", daemon=True).start()

    def paired(self, room: int) -> bool:
        """Whether the prefill side has reported having the room's request."""
        return room in self._paired

    def claim(self, peer: tuple[str, int], room: int, pages: list[int]) -> None:
        self._jobs.put(("claim", peer, room, pages))

    def abort(self, peer: tuple[str, int], room: int, reason: str) -> None:
        with self._lock:
            self._waiting.get(peer, set()).discard(room)
            self._paired.discard(room)
        self._jobs.put(("abort", peer, room, reason))

    def drain(self) -> list[tuple[int, int | None, str | None]]:
        out = []
        while self._results:
            out.append(self._results.popleft())
        return out

    def _done(self, room: int, first_token: int | None, error: str | None) -> None:
        self._results.append((room, first_token, error))
        self._wake.set()

    def _announce_loop(self) -> None:
        while True:
            kind, peer, room, arg = self._jobs.get()
            try:
                if kind == "abort":
                    bootstrap.call(*peer, "/pd/abort", {"room": room, "reason": arg})
                    continue
                self._check_layout(peer)
                bootstrap.call(*peer, "/pd/claim", {
                    "room": room, "session_id": self.session_id, "pages": arg,
                    "ptrs": list(self.bufs.ptrs), "row_bytes": list(self.bufs.row_bytes),
                    "buffer_bytes": list(self.bufs.buffer_bytes),
                    "page_size": self.bufs.page_size})
                with self._lock:
                    self._waiting.setdefault(peer, set()).add(room)
            except (BootstrapError, ValueError, TypeError) as exc:  # refused, or a bad reply
                if kind == "claim":
                    self._done(room, None, str(exc))
                else:
                    logger.info("decode: could not tell the prefill side to drop room "
                                "%d: %s", room, exc)

    def _check_layout(self, peer: tuple[str, int]) -> None:
        """The prefill side's KV layout, learnt once per prefill server."""
        if peer not in self._layouts:
            info = bootstrap.call(*peer, "/pd/info")
            theirs = KVBuffers(ptrs=(), row_bytes=tuple(info.get("row_bytes", ())),
                               buffer_bytes=(), page_size=int(info.get("page_size", 0)))
            self._layouts[peer] = None if theirs.compatible_with(self.bufs) else (
                f"the prefill server {peer[0]}:{peer[1]} has another KV layout (model, "
                f"dtype or --page-size differ)")
        mismatch = self._layouts[peer]
        if mismatch is not None:
            raise BootstrapError(mismatch)

    def _status_loop(self) -> None:
        misses: dict[tuple[str, int], int] = {}
        while True:
            with self._lock:
                polls = [(peer, sorted(rooms)) for peer, rooms in self._waiting.items()
                         if rooms]
            if not polls:
                time.sleep(0.005)
                continue
            for peer, rooms in polls:
                try:
                    states = bootstrap.call(*peer, "/pd/status",
                                            {"rooms": rooms, "wait_s": _STATUS_WAIT_S})["rooms"]
                    if not isinstance(states, dict):
                        raise BootstrapError(f"bootstrap server {peer[0]}:{peer[1]} sent a "
                                             f"malformed status")
                    misses[peer] = 0
                except (BootstrapError, KeyError, TypeError) as exc:
                    misses[peer] = misses.get(peer, 0) + 1
                    if misses[peer] >= _UNREACHABLE_AFTER:
                        self._end_all(peer, rooms, f"lost the prefill server: {exc}")
                    else:
                        time.sleep(0.05)
                    continue
                for room in rooms:
                    s = states.get(str(room))
                    if not isinstance(s, dict):
                        continue
                    if s.get("paired"):
                        self._paired.add(room)
                    if s.get("state") == "done":
                        self._end(peer, room, s.get("first_token"), None)
                    elif s.get("state") == "failed":
                        self._end(peer, room, None,
                                  f"the prefill server failed the request: {s.get('error')}")

    def _end(self, peer: tuple[str, int], room: int, first_token: int | None,
             error: str | None) -> None:
        with self._lock:
            rooms = self._waiting.get(peer, set())
            if room not in rooms:
                return
            rooms.discard(room)
            self._paired.discard(room)
        self._done(room, first_token, error)

    def _end_all(self, peer: tuple[str, int], rooms: list[int], error: str) -> None:
        for room in rooms:
            self._end(peer, room, None, error)
