"""TokenizerManager: the API server's side of the runtime (asyncio, main process).

It tokenizes and validates requests, sends them to the scheduler process over ZMQ,
and fans the detokenizer's BatchStrOut messages out to the waiting requests. The
offline Engine instead drives Scheduler and Detokenizer in-process; the messages
(io_struct) are the same, so both paths share the request semantics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Protocol, TypeVar

import zmq
import zmq.asyncio

from radixserve.managers.io_struct import (
    AbortReq,
    BatchStrOut,
    ExpertDistributionReq,
    ExpertDistributionReqOutput,
    FlushCacheReq,
    FlushCacheReqOutput,
    GetServerInfoReq,
    ServerInfo,
    TokenizedGenerateReqInput,
)
from radixserve.managers.ipc import PortArgs, decode_message, zmq_socket
from radixserve.managers.request_validation import (
    InvalidRequestError,
    ModelLimits,
    RequestValidator,
)
from radixserve.managers.pooling_output import encode_result
from radixserve.metrics.request_observer import make_request_observer
from radixserve.server_args import ServerArgs

logger = logging.getLogger(__name__)

# How often a waiting non-streaming request checks whether its client left.
_DISCONNECT_POLL_S = 0.5

T = TypeVar("T")


class ServerDeadError(RuntimeError):
    """The scheduler or detokenizer process is gone; requests cannot complete."""


class RequestFailedError(RuntimeError):
    """The server could not complete a valid request (e.g. its KV never arrived from the
    prefill server); the HTTP layer answers `status_code` with the message."""

    def __init__(self, message: str, status_code: int = 500) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code


class Disconnectable(Protocol):
    async def is_disconnected(self) -> bool: ...


@dataclass
class GenerateReqInput:
    """One /generate call: a prompt (or a batch of prompts), each sampled n times."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] = field(default_factory=dict)
    rid: str | None = None
    stream: bool = False
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    # Images and videos (SGLang's fields; per prompt for a batch), or, from the chat
    # endpoint, `media`: per prompt its parts already named after the request's fields.
    image_data: Any = None
    video_data: Any = None
    media: list[Any] | None = None
    data_parallel_rank: Any = None  # SGLang's field: the DP replica to run on
    # Prefill/decode disaggregation (set by the router on both halves of a request).
    bootstrap_host: str | None = None
    bootstrap_port: int | None = None
    bootstrap_room: int | None = None


@dataclass
class _ReqState:
    index: int
    rid: str
    prompt_tokens: int
    queue: asyncio.Queue
    return_logprob: bool
    with_text: bool
    text: str = ""
    yielded: int = 0  # chars of `text` already yielded
    ids_yielded: int = 0
    output_ids: list[int] = field(default_factory=list)
    finish_reason: dict[str, Any] | None = None
    finished: bool = False
    completion_tokens: int = 0
    cached_tokens: int = 0
    spec_verify_ct: int = 0  # speculative decoding's verify passes (0: none)
    input_token_logprobs: list[list[Any]] = field(default_factory=list)
    input_top_logprobs: list[Any] = field(default_factory=list)
    output_token_logprobs: list[list[Any]] = field(default_factory=list)
    output_top_logprobs: list[Any] = field(default_factory=list)
    embedding: list[float] | None = None  # a pooling model's answer


class TokenizerManager:
    def __init__(self, server_args: ServerArgs, port_args: PortArgs,
                 model_info: dict[str, Any], tokenizer: Any) -> None:
        self.server_args = server_args
        self.model_info = model_info
        self.limits = ModelLimits.from_model_info(model_info)
        # Embedding / classification / reward models answer /encode and friends only.
        self.pooling = self.limits.pooling
        self.validator = RequestValidator(self.limits, server_args.request_limits())
        self.tokenizer = tokenizer
        self.served_model_name = server_args.served_model_name or str(server_args.model_path)
        self._sync_context = zmq.Context(1)
        self._to_scheduler = zmq_socket(self._sync_context, zmq.PUSH,
                                        port_args.scheduler_input_ipc, bind=False)
        self._async_context = zmq.asyncio.Context(1)
        self._from_workers = zmq_socket(self._async_context, zmq.PULL,
                                        port_args.tokenizer_ipc, bind=True)
        self._states: dict[str, _ReqState] = {}
        self._info_waiters: deque[asyncio.Future] = deque()
        self._flush_waiters: deque[asyncio.Future] = deque()
        self._expert_waiters: deque[asyncio.Future] = deque()  # the expert recorder
        self.dead_reason: str | None = None
        self._loop_task: asyncio.Task | None = None
        # Request timings and counters, --log-requests lines, the trace's root span.
        self.observer = make_request_observer(server_args, self.served_model_name)
        # Tokenizing (and templating) a large prompt takes seconds; done on the event
        # loop it would stall /health and every other request. One thread: the HF
        # tokenizer releases the GIL while it encodes, and one worker never runs two
        # encodes on the same tokenizer at once (not every tokenizer allows that).
        self._tokenize_pool = ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        self._media_preparer: Any = None  # made in that thread on the first image request

    # --- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Start the receive loop; call from inside the running event loop."""
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._handle_loop())

    def mark_dead(self, reason: str) -> None:
        """Fail every pending request at once instead of letting clients hang."""
        if self.dead_reason is not None:
            return
        self.dead_reason = reason
        for state in self._states.values():
            state.queue.put_nowait(state)
        for waiter in (*self._info_waiters, *self._flush_waiters, *self._expert_waiters):
            if not waiter.done():
                waiter.set_exception(ServerDeadError(reason))

    @property
    def num_pending(self) -> int:
        return len(self._states)

    # --- generation ------------------------------------------------------------

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) in the tokenizer thread (so the event loop keeps serving)."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, fn, *args)

    async def generate(self, obj: GenerateReqInput,
                       request: Disconnectable | None = None) -> AsyncIterator[dict[str, Any]]:
        """Tokenize and validate now (InvalidRequestError; in the tokenizer thread), then
        iterate the returned outputs:
        {"index", "text", "delta", "output_ids", "meta_info", "finished"}.

        Streaming requests yield every update; others yield once per finished
        sample. index is prompt_index * n + sample_index. Nothing reaches the
        scheduler until iteration starts; if the consumer stops early (client
        disconnect, cancellation) the unfinished samples are aborted. `request`
        lets a non-streaming request notice that its client left.
        """
        self._check_alive()
        self.validator.check_generates()
        received = time.perf_counter()
        reqs = await self.off_loop(self._tokenize_and_validate, obj)
        return self._run(reqs, obj.stream, obj.return_text_in_logprobs, request, received)

    async def encode(self, text: Any = None, input_ids: Any = None, rid: str | None = None,
                     request: Disconnectable | None = None
                     ) -> tuple[list[dict[str, Any]], bool]:
        """A pooling model's answer per prompt, in prompt order, as SGLang's /encode
        items ({"embedding", "meta_info"}), and whether a single prompt was given.
        Bad input raises InvalidRequestError (tokenized and checked in the tokenizer
        thread, like generate's)."""
        self._check_alive()
        received = time.perf_counter()
        reqs, single = await self.off_loop(self.validator.prepare_pooling, text, input_ids,
                                           self.tokenizer, rid)
        outputs: list[dict[str, Any]] = []
        async with aclosing(self._run(reqs, False, False, request, received)) as gen:
            async for out in gen:
                outputs.append(out)
        # Fewer outputs than prompts: the client left (the rest were aborted), and
        # nobody reads this answer.
        outputs.sort(key=lambda o: o["index"])
        return [encode_result(o["meta_info"]["id"], o.get("embedding") or [],
                              o["meta_info"]["prompt_tokens"], o["meta_info"]["finish_reason"],
                              o["meta_info"]["cached_tokens"]) for o in outputs], single

    async def _run(self, reqs: list[TokenizedGenerateReqInput], stream: bool, with_text: bool,
                   request: Disconnectable | None, received: float
                   ) -> AsyncIterator[dict[str, Any]]:
        queue: asyncio.Queue = asyncio.Queue()
        states = {
            req.rid: _ReqState(index=index, rid=req.rid, prompt_tokens=len(req.input_ids),
                               queue=queue, return_logprob=req.return_logprob,
                               with_text=with_text)
            for index, req in enumerate(reqs)
        }
        if any(rid in self._states for rid in states):
            raise InvalidRequestError("a request with this rid is already running", "rid")
        self._states.update(states)
        try:
            self.observer.on_sent(reqs, received)
            for req in reqs:
                self._to_scheduler.send_pyobj(req)
            remaining = len(states)
            while remaining:
                state = await self._next_update(queue, request)
                if state is None:
                    return  # the client went away; finally aborts the rest
                self._check_alive()
                reason = state.finish_reason or {}
                if reason.get("status_code") == 400:
                    raise InvalidRequestError(reason.get("message", "invalid request"),
                                              reason.get("param"))
                if isinstance(reason.get("status_code"), int) and reason["status_code"] >= 500:
                    raise RequestFailedError(reason.get("message", "request failed"),
                                             reason["status_code"])
                if not (stream or state.finished):
                    continue
                output = self._snapshot(state)
                if output is None:
                    continue
                if state.finished:
                    remaining -= 1
                yield output
        finally:
            for rid, state in states.items():
                if self._states.pop(rid, None) is not None and not state.finished:
                    self.abort_request(rid)

    async def _next_update(self, queue: asyncio.Queue,
                           request: Disconnectable | None) -> _ReqState | None:
        while True:
            if request is None:
                return await queue.get()
            try:
                return await asyncio.wait_for(queue.get(), _DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return None

    def _snapshot(self, state: _ReqState) -> dict[str, Any] | None:
        if not state.finished and state.ids_yielded == len(state.output_ids):
            return None  # a duplicate wake-up: nothing new
        delta = state.text[state.yielded:]
        state.yielded = len(state.text)
        state.ids_yielded = len(state.output_ids)
        meta: dict[str, Any] = {
            "id": state.rid,
            "finish_reason": state.finish_reason,
            "prompt_tokens": state.prompt_tokens,
            "completion_tokens": state.completion_tokens,
            "cached_tokens": state.cached_tokens,
        }
        if state.spec_verify_ct:
            meta.update(spec_verify_ct=state.spec_verify_ct,
                        spec_accept_length=state.completion_tokens / state.spec_verify_ct)
        if state.return_logprob:
            meta.update(
                input_token_logprobs=state.input_token_logprobs,
                output_token_logprobs=state.output_token_logprobs,
                input_top_logprobs=state.input_top_logprobs,
                output_top_logprobs=state.output_top_logprobs,
            )
        out = {"index": state.index, "text": state.text, "delta": delta,
               "output_ids": list(state.output_ids), "meta_info": meta,
               "finished": state.finished}
        if state.embedding is not None:
            out["embedding"] = state.embedding
        return out

    def abort_request(self, rid: str = "", abort_all: bool = False) -> None:
        """Abort a request; a base rid of an n > 1 or batch request aborts all its parts.
        `abort_all` (SGLang's field) aborts every request this manager tracks; rid is
        ignored then."""
        if abort_all:
            for r in list(self._states):
                self._to_scheduler.send_pyobj(AbortReq(r))
            return
        parts = [r for r in self._states if r.startswith(rid + "-")]
        for r in (rid, *parts):
            self._to_scheduler.send_pyobj(AbortReq(r))

    def _check_alive(self) -> None:
        if self.dead_reason is not None:
            raise ServerDeadError(self.dead_reason)

    # --- tokenization and validation -------------------------------------------

    def _tokenize_and_validate(self, obj: GenerateReqInput) -> list[TokenizedGenerateReqInput]:
        """The shared rules (request_validation.py), the same as the offline Engine's."""
        try:
            return self._tokenize_and_validate_one(obj)
        except InvalidRequestError as exc:
            if self.server_args.disaggregation_mode == "decode":
                # The prefill half of this request is already running: free it now.
                from radixserve.disaggregation.bootstrap import tell_abort

                tell_abort(obj.bootstrap_host, obj.bootstrap_port, obj.bootstrap_room,
                           f"the decode server refused the request: {exc.message}")
            raise

    def _tokenize_and_validate_one(self, obj: GenerateReqInput
                                   ) -> list[TokenizedGenerateReqInput]:
        rank = self.validator.check_data_parallel_rank(obj.data_parallel_rank,
                                                       self.server_args.dp_size)
        if obj.media is not None or obj.image_data is not None or obj.video_data is not None:
            reqs = self._prepare_with_media(obj)
        else:
            reqs, _single = self.validator.prepare(
                obj.text, obj.input_ids, self.tokenizer, obj.sampling_params,
                return_logprob=obj.return_logprob, logprob_start_len=obj.logprob_start_len,
                top_logprobs_num=obj.top_logprobs_num, stream=obj.stream, rid=obj.rid)
        for req in reqs:
            req.data_parallel_rank = rank
        self._attach_bootstrap(obj, reqs)
        return reqs

    def _attach_bootstrap(self, obj: GenerateReqInput,
                          reqs: list[TokenizedGenerateReqInput]) -> None:
        """A prefill or decode server serves only requests paired through a bootstrap
        room (the router adds it); any other server refuses one."""
        mode = self.server_args.disaggregation_mode
        self.validator.check_bootstrap(obj.bootstrap_host, obj.bootstrap_port,
                                       obj.bootstrap_room)
        if obj.bootstrap_room is None:
            if mode != "null":
                raise InvalidRequestError(
                    f"this is a {mode} server (--disaggregation-mode {mode}): send requests "
                    f"through the router, which adds bootstrap_host, bootstrap_port and "
                    f"bootstrap_room", "bootstrap_room")
            return
        if mode == "null":
            raise InvalidRequestError("bootstrap_room is for prefill and decode servers "
                                      "(--disaggregation-mode); this one is neither",
                                      "bootstrap_room")
        if len(reqs) != 1:
            raise InvalidRequestError("a disaggregated request has one prompt and n = 1 "
                                      "(one bootstrap room)", "bootstrap_room")
        reqs[0].bootstrap_host = obj.bootstrap_host
        reqs[0].bootstrap_port = obj.bootstrap_port
        reqs[0].bootstrap_room = obj.bootstrap_room

    def media_preparer(self) -> Any:
        """The model's image/video processing (multimodal_requests.MediaPreparer), made on
        first use; call it in the tokenizer thread."""
        if self._media_preparer is None:
            from radixserve.configs.model_config import load_hf_config
            from radixserve.managers.multimodal_requests import MediaPreparer

            args = self.server_args
            hf_config = load_hf_config(str(args.model_path), args.is_gguf,
                                       args.trust_remote_code)
            self._media_preparer = MediaPreparer(hf_config, str(args.model_path),
                                                 args.multimodal_config(), self.limits)
        return self._media_preparer

    def _prepare_with_media(self, obj: GenerateReqInput) -> list[TokenizedGenerateReqInput]:
        """Images and videos are loaded and processed here, in the tokenizer thread."""
        from radixserve.managers.multimodal_requests import prepare_with_media

        reqs, _single = prepare_with_media(
            self.validator, self.media_preparer(), obj.text, obj.input_ids, self.tokenizer,
            obj.media, obj.sampling_params, return_logprob=obj.return_logprob,
            logprob_start_len=obj.logprob_start_len, top_logprobs_num=obj.top_logprobs_num,
            stream=obj.stream, rid=obj.rid, image_data=obj.image_data,
            video_data=obj.video_data)
        return reqs

    # --- control requests ------------------------------------------------------

    async def get_server_info(self, timeout_s: float = 30.0) -> ServerInfo:
        return await self._ask(GetServerInfoReq(), self._info_waiters, timeout_s)

    async def flush_cache(self, timeout_s: float = 30.0) -> bool:
        reply = await self._ask(FlushCacheReq(), self._flush_waiters, timeout_s)
        return reply.success

    async def expert_distribution(self, action: str, timeout_s: float = 60.0
                                  ) -> ExpertDistributionReqOutput:
        """The expert-load recorder: start, stop or dump (managers/expert_record.py)."""
        return await self._ask(ExpertDistributionReq(action), self._expert_waiters, timeout_s)

    async def _ask(self, msg: object, waiters: deque, timeout_s: float) -> Any:
        self._check_alive()
        future = asyncio.get_running_loop().create_future()
        waiters.append(future)
        self._to_scheduler.send_pyobj(msg)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except asyncio.TimeoutError:
            # Keep the FIFO aligned with the scheduler's replies: the late reply
            # resolves this (abandoned) future.
            raise ServerDeadError(f"the scheduler did not answer {type(msg).__name__} "
                                  f"within {timeout_s}s") from None

    # --- receive loop ----------------------------------------------------------

    async def _handle_loop(self) -> None:
        while True:
            msg = decode_message(await self._from_workers.recv())
            try:
                self._dispatch(msg)
            except Exception:  # one bad message must not strand every other request
                logger.exception("failed to dispatch %r", type(msg).__name__)

    def _dispatch(self, msg: object) -> None:
        if isinstance(msg, BatchStrOut):
            self._dispatch_outputs(msg)
        elif isinstance(msg, ServerInfo):
            _resolve(self._info_waiters, msg)
        elif isinstance(msg, FlushCacheReqOutput):
            _resolve(self._flush_waiters, msg)
        elif isinstance(msg, ExpertDistributionReqOutput):
            _resolve(self._expert_waiters, msg)
        else:
            logger.warning("tokenizer manager ignores unexpected %r", type(msg).__name__)

    def _dispatch_outputs(self, out: BatchStrOut) -> None:
        self.observer.on_output(out)
        for i, rid in enumerate(out.rids):
            state = self._states.get(rid)
            if state is None:
                continue  # aborted and forgotten already
            state.text += out.text_deltas[i]
            state.output_ids.extend(out.output_ids[i])
            state.completion_tokens = out.completion_tokens[i]
            state.cached_tokens = out.cached_tokens[i]
            if out.spec_verify_ct:
                state.spec_verify_ct = out.spec_verify_ct[i]
            if out.embeddings and out.embeddings[i] is not None:
                state.embedding = out.embeddings[i]
            if state.return_logprob:
                self._append_logprobs(state, out, i)
            if out.finished_reasons[i] is not None:
                state.finish_reason = out.finished_reasons[i]
                state.finished = True
                reason = state.finish_reason
                if isinstance(reason, dict) and reason.get("type") == "abort":
                    # An abort may come from the detokenizer (a row it could not
                    # decode), which the scheduler never hears of: let it free the KV.
                    self._to_scheduler.send_pyobj(AbortReq(rid))
            state.queue.put_nowait(state)

    def _append_logprobs(self, state: _ReqState, out: BatchStrOut, i: int) -> None:
        if out.input_token_logprobs[i]:
            state.input_token_logprobs.extend(
                self._with_text(out.input_token_logprobs[i], state.with_text))
        if out.input_top_logprobs[i]:
            state.input_top_logprobs.extend(
                self._with_text(top, state.with_text) if top else None
                for top in out.input_top_logprobs[i])
        if out.output_token_logprobs[i]:
            state.output_token_logprobs.extend(
                self._with_text(out.output_token_logprobs[i], state.with_text))
        if out.output_top_logprobs[i]:
            state.output_top_logprobs.extend(
                self._with_text(top, state.with_text) for top in out.output_top_logprobs[i])

    def _with_text(self, pairs: list[tuple[Any, int]], with_text: bool) -> list[list[Any]]:
        if not with_text or self.tokenizer is None:
            return [[lp, tid, None] for lp, tid in pairs]
        return [[lp, tid, self.tokenizer.decode([tid])] for lp, tid in pairs]


def _resolve(waiters: deque, reply: Any) -> None:
    while waiters:
        future = waiters.popleft()
        if not future.done():
            future.set_result(reply)
            return
