"""Incremental detokenization: token ids from the scheduler -> text deltas.

`Detokenizer` is a pure class; the offline Engine runs it in-process, and the
server runs the very same class in its own process (`run_detokenizer_process`),
between the scheduler and the TokenizerManager (docs/architecture.md, "Processes").

Two invariants hold for every request, so that the concatenated deltas equal
the final text:
* a multi-byte character split across tokens is never sent half-done (decoded
  text that ends in U+FFFD is held back until the next token completes it);
* text that is, or could become, one of the request's stop strings is held
  back while streaming, so nothing inside or after a stop string is ever sent.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import zmq

from radixserve.managers.io_struct import BatchStrOut, BatchTokenIDOut, RegisterStopStrsReq
from radixserve.managers.ipc import (MALFORMED, PortArgs, recv_message, start_parent_watchdog,
                                     zmq_socket)
from radixserve.metrics.log_format import configure_logging
from radixserve.metrics.trace_setup import make_detokenizer_observer
from radixserve.server_args import ServerArgs

logger = logging.getLogger(__name__)

_REPLACEMENT_CHAR = "\ufffd"


@dataclass
class _DecodeState:
    stop_strs: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    # ids[prefix_offset:read_offset] were decoded last time; decoding them again with
    # the new ids gives the tokenizer the context it needs (leading spaces, bytes).
    prefix_offset: int = 0
    read_offset: int = 0
    text: str = ""  # committed text: never ends in a partial character
    sent: int = 0  # chars of `text` already handed out


class Detokenizer:
    """Keeps per-request decode state; `handle` turns a BatchTokenIDOut into deltas."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._states: dict[str, _DecodeState] = {}

    def register(self, rid: str, stop_strs: list[str]) -> None:
        """Declare a request's stop strings; call before its first output."""
        self._states[rid] = _DecodeState(stop_strs=[s for s in stop_strs if s])

    def num_active(self) -> int:
        return len(self._states)

    def handle(self, out: BatchTokenIDOut) -> BatchStrOut:
        """Deltas for every row; a row that cannot be decoded ends its request alone
        (finish reason abort, with the error), and the other rows go on."""
        finished = list(out.finished_reasons)
        deltas: list[str] = []
        for i, rid in enumerate(out.rids):
            try:
                deltas.append(self._handle_one(
                    rid, out.new_output_ids[i], finished[i], out.skip_special_tokens[i],
                    out.spaces_between_special_tokens[i], out.no_stop_trim[i]))
            except Exception as exc:
                logger.exception("cannot detokenize request %r; ending it", rid)
                if isinstance(rid, str):
                    self._states.pop(rid, None)
                deltas.append("")
                finished[i] = {"type": "abort",
                               "message": f"the detokenizer failed on this request: {exc!r}"}
        return BatchStrOut(
            rids=out.rids,
            text_deltas=deltas,
            output_ids=out.new_output_ids,
            finished_reasons=finished,
            prompt_tokens=out.prompt_tokens,
            completion_tokens=out.completion_tokens,
            cached_tokens=out.cached_tokens,
            output_token_logprobs=out.output_token_logprobs,
            output_top_logprobs=out.output_top_logprobs,
            input_token_logprobs=out.input_token_logprobs,
            input_top_logprobs=out.input_top_logprobs,
            spec_verify_ct=out.spec_verify_ct,
            embeddings=out.embeddings,
        )

    def _handle_one(self, rid: str, new_ids: list[int], finished: dict[str, Any] | None,
                    skip_special: bool, spaces_between: bool, no_stop_trim: bool) -> str:
        state = self._states.get(rid)
        if state is None:
            state = self._states[rid] = _DecodeState()
        matched = finished.get("matched") if finished and finished.get("type") == "stop" else None
        if isinstance(matched, int) and not no_stop_trim and new_ids and new_ids[-1] == matched:
            # A stop token id is not part of the text, like EOS.
            new_ids = new_ids[:-1]
        state.ids.extend(new_ids)
        self._commit(state, final=finished is not None,
                     skip_special=skip_special, spaces_between=spaces_between)
        if finished is None:
            end = _sendable_end(state.text, state.sent, state.stop_strs)
            delta = state.text[state.sent:end]
            state.sent = max(state.sent, end)
            return delta
        del self._states[rid]
        text = state.text
        if isinstance(matched, str) and matched and not no_stop_trim:
            cut = text.find(matched, max(0, state.sent - len(matched) + 1))
            if cut >= 0:
                text = text[:max(cut, state.sent)]
        return text[state.sent:]

    def _commit(self, state: _DecodeState, final: bool, skip_special: bool,
                spaces_between: bool) -> None:
        if state.read_offset == len(state.ids):
            return
        kwargs = {"skip_special_tokens": skip_special,
                  "spaces_between_special_tokens": spaces_between}
        prefix = self.tokenizer.decode(state.ids[state.prefix_offset:state.read_offset], **kwargs)
        full = self.tokenizer.decode(state.ids[state.prefix_offset:], **kwargs)
        if full.endswith(_REPLACEMENT_CHAR) and not final:
            return
        if len(full) > len(prefix):
            state.text += full[len(prefix):]
            state.prefix_offset = state.read_offset
            state.read_offset = len(state.ids)


def _sendable_end(text: str, sent: int, stop_strs: list[str]) -> int:
    """How far `text` may be sent: up to the first stop string, or to where a
    trailing fragment that could still grow into a stop string begins."""
    end = len(text)
    for stop in stop_strs:
        found = text.find(stop, max(0, sent - len(stop) + 1))
        if found >= 0:
            end = min(end, found)
            continue
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                end = min(end, len(text) - k)
                break
    return max(end, sent)


def run_detokenizer_process(server_args: ServerArgs, port_args: PortArgs,
                            ready_pipe: Connection) -> None:
    """Process entry: scheduler outputs in, text deltas out to the TokenizerManager."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent shuts us down
    configure_logging(server_args.log_level, "detokenizer")
    start_parent_watchdog()
    observer = make_detokenizer_observer(server_args.enable_trace,
                                         server_args.otlp_traces_endpoint)
    try:
        from radixserve.model_loader.tokenizer import get_tokenizer

        detokenizer = Detokenizer(get_tokenizer(server_args.load_config()))
        context = zmq.Context(2)
        recv = zmq_socket(context, zmq.PULL, port_args.detokenizer_ipc, bind=True)
        send = zmq_socket(context, zmq.PUSH, port_args.tokenizer_ipc, bind=False)
    except Exception as exc:  # report the reason to the launcher, then die
        logger.exception("detokenizer failed to start")
        ready_pipe.send({"status": "error", "message": repr(exc)})
        raise SystemExit(1) from exc
    ready_pipe.send({"status": "ready"})
    while True:
        msg = recv_message(recv)
        try:
            if isinstance(msg, RegisterStopStrsReq):
                detokenizer.register(msg.rid, msg.stop_strs)
            elif isinstance(msg, BatchTokenIDOut):
                start = time.time_ns()
                out = detokenizer.handle(msg)
                end = time.time_ns()
                send.send_pyobj(out)
                observer.on_handled(out, start, end)
            elif msg is not MALFORMED:
                logger.warning("detokenizer ignores unexpected message %r", type(msg).__name__)
        except Exception:  # a message whose very shape is wrong: drop it, keep serving
            logger.exception("detokenizer dropped a malformed %r", type(msg).__name__)
