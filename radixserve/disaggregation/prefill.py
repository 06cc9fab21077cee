"""The prefill server's role: prefill each request, sample its first token, send its KV
pages to the decode server that claimed its bootstrap room, then free them.

A room's life on this side:

  queued     the request waits for (or is in) its prefill; a claim may already be here
  prefilled  the prompt's KV is computed and pinned (finishing the request keeps it)
  sending    the transfer engine writes the pages into the decode server's pool
  done       written; the pages are unpinned and the request finished
  failed     aborted by either side, or nobody claimed the room in time; pages freed

The bootstrap server's threads (claims, status, aborts) and the scheduler's thread meet
in the room table under one condition variable; only the scheduler's thread touches
requests and KV.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from radixserve.configs.disaggregation_config import DisaggregationConfig
from radixserve.core.req import Req
from radixserve.disaggregation.bootstrap import BootstrapServer
from radixserve.disaggregation.kv_layout import KVBuffers, transfer_plan
from radixserve.disaggregation.roles import (Finish, KVHost, Reason, check_paired, failed,
                                             pages_of)
from radixserve.disaggregation.transfer import MooncakeTransfer

logger = logging.getLogger(__name__)

_TERMINAL = ("done", "failed")


@dataclass
class _Room:
    room: int
    req: Req | None = None
    claim: dict[str, Any] | None = None
    state: str = "queued"
    first_token: int | None = None
    error: str | None = None
    aborted: str | None = None  # the decode side's reason, once it gave up
    deadline: float = math.inf  # per state: claim expiry, claim wait, record expiry
    sending: Future | None = None


class PrefillRole:
    def __init__(self, config: DisaggregationConfig, kv: KVHost, kv_pool: object,
                 page_size: int, finish: Finish, abort: Callable[[str, Reason], None]
                 ) -> None:
        self.config = config
        self.kv = kv
        self.page_size = page_size
        self._finish = finish
        self._abort = abort
        self.bufs = KVBuffers.from_pool(kv_pool, page_size)
        self.transfer = MooncakeTransfer(config.host, config.ib_device)
        self.transfer.register(self.bufs)
        self._cond = threading.Condition()
        self._rooms: dict[int, _Room] = {}
        self._sender = ThreadPoolExecutor(1, thread_name_prefix="pd-send")
        self.server = BootstrapServer(self, config.host, config.bootstrap_port)
        logger.info("prefill bootstrap server on %s:%d; transfer session %s", config.host,
                    config.bootstrap_port, self.transfer.session_id)

    # --- the bootstrap server's side (its threads) ----------------------------------

    def info(self) -> dict[str, Any]:
        return {"mode": "prefill", "session_id": self.transfer.session_id,
                "row_bytes": list(self.bufs.row_bytes), "page_size": self.page_size}

    def claim(self, body: dict[str, Any]) -> None:
        room = int(body["room"])
        dst = KVBuffers(ptrs=tuple(int(p) for p in body["ptrs"]),
                        row_bytes=tuple(int(r) for r in body["row_bytes"]),
                        buffer_bytes=tuple(int(b) for b in body["buffer_bytes"]),
                        page_size=int(body["page_size"]))
        if not self.bufs.compatible_with(dst):
            raise ValueError("the decode server's KV layout differs from this prefill "
                             "server's (model, dtype or --page-size)")
        claim = {"session_id": str(body["session_id"]), "dst": dst,
                 "pages": [int(p) for p in body["pages"]]}
        with self._cond:
            r = self._rooms.get(room)
            if r is None:  # the decode half arrived first
                r = self._rooms[room] = _Room(room, deadline=self._later())
            if r.claim is not None:
                raise ValueError(f"bootstrap_room {room} is already claimed")
            if r.state == "failed":
                raise ValueError(f"bootstrap_room {room} failed: {r.error}")
            r.claim = claim
            self._cond.notify_all()

    def status(self, rooms: list[int], wait_s: float) -> dict[str, dict[str, Any]]:
        def ended() -> bool:
            return any(self._rooms.get(n) is not None and self._rooms[n].state in _TERMINAL
                       for n in rooms)

        with self._cond:
            self._cond.wait_for(ended, timeout=wait_s)
            out = {}
            for n in rooms:
                r = self._rooms.get(n)
                state = "unknown" if r is None else r.state
                # Paired: this side has (or had) the request, not just a claim for it.
                paired = r is not None and (r.req is not None or r.state != "queued")
                out[str(n)] = {"state": state, "paired": paired,
                               "first_token": r and r.first_token, "error": r and r.error}
            return out

    def abort(self, room: int, reason: str) -> None:
        with self._cond:
            r = self._rooms.get(room)
            if r is None:  # before the prefill half arrived: refuse it when it does
                r = self._rooms[room] = _Room(room, deadline=self._later())
            r.aborted = reason or "the decode server gave up on the request"
            self._cond.notify_all()

    # --- the scheduler's side --------------------------------------------------------

    def check_request(self, req: Req) -> None:
        check_paired(req, "prefill")
        with self._cond:
            r = self._rooms.get(int(req.bootstrap_room or 0))
            if r is not None and (r.req is not None or r.state in _TERMINAL):
                raise ValueError(f"bootstrap_room {req.bootstrap_room} is already in use")

    def enqueue(self, req: Req, waiting: list[Req]) -> None:
        room = int(req.bootstrap_room or 0)
        with self._cond:
            r = self._rooms.setdefault(room, _Room(room))
            r.req, r.deadline = req, math.inf
        waiting.append(req)

    def decodes_here(self, req: Req) -> bool:
        """The prompt is prefilled: pin its KV until it is sent."""
        with self._cond:
            r = self._rooms[req.bootstrap_room]
            r.state, r.deadline = "prefilled", time.monotonic() + self.config.bootstrap_timeout_s
        req.kv_pinned = True
        return False

    def poll(self) -> list[Req]:
        now = time.monotonic()
        with self._cond:
            rooms = list(self._rooms.values())
        for r in rooms:
            if r.state in _TERMINAL or r.req is None:
                if now > r.deadline:
                    with self._cond:
                        self._rooms.pop(r.room, None)
            elif r.state == "queued":
                self._poll_queued(r)
            elif r.state == "prefilled":
                self._poll_prefilled(r, now)
            elif r.state == "sending" and r.sending is not None and r.sending.done():
                exc = r.sending.exception()
                if exc is not None:
                    self._fail(r, f"sending the KV of bootstrap_room {r.room} failed: {exc}")
                else:
                    self._end(r, "done")
        return []

    def _poll_queued(self, r: _Room) -> None:
        req = r.req
        assert req is not None
        if r.aborted is not None and not req.finished():
            # Out of the queue at once, or off its prefill at the next step.
            self._abort(req.rid, failed(r.aborted))
        if req.finished():
            reason = r.aborted or f"the request ended before its prefill: {req.finished_reason}"
            self._end(r, "failed", reason)

    def _poll_prefilled(self, r: _Room, now: float) -> None:
        req = r.req
        assert req is not None
        if r.aborted is not None or req.to_abort:
            self._fail(r, r.aborted or "aborted by the client")
        elif req.num_resolved == 0 and not req.finished():
            return  # its first token is still being sampled
        elif not req.output_ids:
            self._fail(r, f"the prefill produced no first token: {req.finished_reason}")
        elif r.claim is not None:
            self._send(r)
        elif now > r.deadline:
            self._fail(r, f"no decode server claimed bootstrap_room {r.room} within "
                          f"{self.config.bootstrap_timeout_s:g} s "
                          f"(--disaggregation-bootstrap-timeout)")

    def _send(self, r: _Room) -> None:
        req, claim = r.req, r.claim
        assert req is not None and claim is not None
        slots = self.kv.req_to_token_pool.read(req.req_pool_idx, len(req.origin_input_ids))
        src_pages = pages_of(slots, self.page_size)
        try:
            plan = transfer_plan(self.bufs, src_pages, claim["dst"], claim["pages"])
        except ValueError as exc:
            self._fail(r, f"bootstrap_room {r.room}: {exc}")
            return
        r.first_token = req.output_ids[0]
        r.state = "sending"
        r.sending = self._sender.submit(self.transfer.write, claim["session_id"], plan)

    def _fail(self, r: _Room, message: str) -> None:
        logger.warning("prefill: %s", message)
        self._end(r, "failed", message)

    def _end(self, r: _Room, state: str, error: str | None = None) -> None:
        """Record the room's outcome for the decode side, then free the request's KV."""
        with self._cond:
            r.state, r.error, r.deadline = state, error, self._later()
            self._cond.notify_all()
        req, r.req = r.req, None
        if req is None:
            return
        req.kv_pinned = False
        if req.finished():
            self.kv.release(req)
        elif state == "done":
            self._finish(req, {"type": "length", "length": len(req.output_ids)})
        else:
            self._finish(req, failed(error or "the KV transfer failed"))

    def _later(self) -> float:
        return time.monotonic() + self.config.bootstrap_timeout_s

    def has_work(self) -> bool:
        with self._cond:
            return any(r.req is not None and r.state in ("prefilled", "sending")
                       for r in self._rooms.values())

    def num_held(self) -> int:
        with self._cond:
            return sum(r.req is not None and r.state in ("prefilled", "sending")
                       for r in self._rooms.values())

    def idle_wait(self, timeout_s: float) -> None:
        with self._cond:
            self._cond.wait(timeout_s)
