"""The offline Engine: generate from Python without a server.

It runs the same Scheduler and Detokenizer classes as the server, in this process:
the server puts each in its own process only so that HTTP handling, tokenization and
the GPU loop overlap. Results are identical because the scheduling code is the same,
and so are the request checks: both paths validate with request_validation.py.

Concurrency: one scheduler serves every call (generate, its streams, async_generate
from any number of tasks or threads). Whoever needs progress runs the next scheduler
step under `Engine._lock` and routes every output of that step to the call that owns
its rid (a `_Mailbox`); a call whose mailbox already has news does not step. So calls
interleave step by step and batch together, and none is starved. async_generate runs
its steps in a worker thread (asyncio.to_thread), one at a time per event loop, so the
loop stays free while the model runs.

`encode` answers embedding, classification and reward models (configs/pooling_config.py)
with SGLang's {"embedding", "meta_info"} items; on such a model generate and chat are
refused with the server's 400 message.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing, closing
from typing import Any

from radixserve.core.sampling_params import SamplingParams
from radixserve.managers.data_parallel_controller import (DataParallelController,
                                                         launch_engine_replicas)
from radixserve.managers.detokenizer_manager import Detokenizer
from radixserve.managers.io_struct import BatchStrOut, TokenizedGenerateReqInput, spec_meta
from radixserve.managers.multimodal_requests import MediaPreparer, chat_media, prepare_with_media
from radixserve.managers.pooling_output import encode_result, truncate_embedding
from radixserve.managers.request_validation import (InvalidRequestError, ModelLimits,
                                                    RequestValidator)
from radixserve.managers.scheduler import Scheduler
from radixserve.managers.scheduler_interface import SchedulerInterface
from radixserve.metrics.progress import progress_bar
from radixserve.server_args import ServerArgs

logger = logging.getLogger(__name__)

Prompt = str | list[int]
SamplingArg = dict[str, Any] | SamplingParams | None

# SGLang's generate/async_generate parameters that radixserve does not support yet:
# accepted only at their defaults, so SGLang call sites run unchanged when they do not
# use them, and fail loudly when they do.
_UNSUPPORTED_NONE = ("audio_data", "token_ids_logprob",
                     "lora_path", "custom_logit_processor", "bootstrap_host",
                     "bootstrap_port", "bootstrap_room", "routed_dp_rank",
                     "disagg_prefill_dp_rank", "external_trace_header",
                     "session_params", "priority")
_UNSUPPORTED_FALSE = ("return_hidden_states", "return_routed_experts")
# What Engine.chat passes on to the request when its messages carry images or videos.
_CHAT_MEDIA_KWARGS = ("return_logprob", "logprob_start_len", "top_logprobs_num", "stream",
                      "rid")


def _check_unsupported(what: str, args: dict[str, Any]) -> None:
    """`args`: the keyword arguments past the supported ones. SGLang's others must be
    at their defaults; a name SGLang does not have is a TypeError, as in Python."""
    unknown = sorted(set(args) - set(_UNSUPPORTED_NONE) - set(_UNSUPPORTED_FALSE))
    if unknown:
        raise TypeError(f"{what}() got unexpected keyword argument(s) {unknown}")
    used = [k for k in _UNSUPPORTED_NONE if args.get(k) is not None]
    used += [k for k in _UNSUPPORTED_FALSE if args.get(k)]
    if used:
        raise ValueError(f"{what}: {', '.join(used)} not supported yet by radixserve "
                         f"(leave {'it' if len(used) == 1 else 'them'} at the default)")


class _Mailbox:
    """One call's outputs, filled by whichever caller runs the scheduler step."""

    def __init__(self, rids: list[str]) -> None:
        self.rids = rids
        self.pending = set(rids)  # touched only by the owning call
        self.items: deque[tuple[BatchStrOut, int]] = deque()  # appended under Engine._lock

    def drain(self) -> Iterator[tuple[BatchStrOut, int]]:
        """The outputs delivered so far, noting which requests they finish."""
        while self.items:
            out, i = self.items.popleft()
            if out.finished_reasons[i] is not None:
                self.pending.discard(out.rids[i])
            yield out, i


class Engine:
    """`Engine(model_path=None, **server_args)`; see ServerArgs for the settings.

    `import radixserve as rs; rs.Engine(...)` is the same class."""

    def __init__(self, model_path: str | None = None, **kwargs: Any) -> None:
        self.server_args = ServerArgs(model_path=model_path, **kwargs)
        self.scheduler: SchedulerInterface
        if self.server_args.tp_size == 1 and self.server_args.dp_size == 1:
            self.scheduler = Scheduler(self.server_args)
        else:
            # Each TP rank of each DP replica runs in a process of its own (distributed/).
            self.scheduler = launch_engine_replicas(self.server_args)
        self.tokenizer = self.scheduler.tokenizer
        self.model_config = self.scheduler.model_config
        self.limits: ModelLimits = self.scheduler.model_limits()
        self.validator = RequestValidator(self.limits, self.server_args.request_limits())
        self.detokenizer = Detokenizer(self.tokenizer) if self.tokenizer is not None else None
        self._media_preparer: MediaPreparer | None = None
        self._lock = threading.Lock()  # the scheduler, the detokenizer and _boxes
        self._boxes: dict[str, _Mailbox] = {}
        self._aborts: deque[str] = deque()  # rids to abort at the next step
        self._step_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop,
                                                    asyncio.Lock] = weakref.WeakKeyDictionary()
        # async_generate steps in worker threads; CUDA's current device is per thread.
        self._cuda_device: int | None = None
        if self.server_args.device == "cuda" and isinstance(self.scheduler, Scheduler):
            import torch

            self._cuda_device = torch.cuda.current_device()

    # --- public API ---------------------------------------------------------------

    def generate(self, prompt: Prompt | list[Prompt] | None = None,
                 sampling_params: SamplingArg | list[SamplingArg] = None,
                 input_ids: list[int] | list[list[int]] | None = None, *,
                 return_logprob: bool = False, logprob_start_len: int | None = None,
                 top_logprobs_num: int | None = None, stream: bool = False,
                 rid: str | None = None, image_data: Any = None, video_data: Any = None,
                 data_parallel_rank: int | None = None, **sglang_kwargs: Any,
                 ) -> dict[str, Any] | list[dict[str, Any]] | Iterator[dict]:
        """SGLang-shaped results: {"text", "output_ids", "meta_info"} per prompt (and per
        sample when n > 1). A single prompt gives a dict, a list gives a list. With
        stream=True, yields increments {"text": delta, "output_ids": new ids, ...,
        "index"}. Bad requests raise ValueError (InvalidRequestError, as the server's
        400s). The parameters follow SGLang's Engine.generate; SGLang's others (lora_path,
        bootstrap_*, ...) are accepted as keywords at their defaults only. image_data /
        video_data (vision-language models; docs/multimodal.md): per prompt a payload (data:
        URL, path, base64, bytes, PIL image) or a list of them; a list per prompt for a
        batch."""
        _check_unsupported("generate", sglang_kwargs)
        reqs, single = self._prepare(prompt, input_ids, sampling_params, return_logprob,
                                     logprob_start_len, top_logprobs_num, stream, rid,
                                     image_data, video_data, data_parallel_rank)
        if stream:
            return self._stream(reqs)
        results = self._run_to_completion(reqs)
        return results[0] if single and len(results) == 1 else results

    async def async_generate(
            self, prompt: Prompt | list[Prompt] | None = None,
            sampling_params: SamplingArg | list[SamplingArg] = None,
            input_ids: list[int] | list[list[int]] | None = None, *,
            return_logprob: bool = False, logprob_start_len: int | None = None,
            top_logprobs_num: int | None = None, stream: bool = False,
            rid: str | None = None, image_data: Any = None, video_data: Any = None,
            data_parallel_rank: int | None = None, **sglang_kwargs: Any,
    ) -> dict[str, Any] | list[dict[str, Any]] | AsyncIterator[dict[str, Any]]:
        """generate, awaitable (SGLang's signature): the same results; with stream=True
        it returns (after the await, as SGLang does) an async iterator of the same
        increments as generate's stream. The request is validated at the await.
        Concurrent calls from one event loop (asyncio.gather) share the scheduler and
        are batched together; the loop is not blocked while the model runs."""
        _check_unsupported("async_generate", sglang_kwargs)
        reqs, single = self._prepare(prompt, input_ids, sampling_params, return_logprob,
                                     logprob_start_len, top_logprobs_num, stream, rid,
                                     image_data, video_data, data_parallel_rank)
        if stream:
            return self._astream(reqs)
        acc = {r.rid: _Accumulator(r.rid) for r in reqs}
        async with aclosing(self._aoutputs(reqs)) as outputs:
            async for out, i in outputs:
                acc[out.rids[i]].add(out, i)
        results = [acc[r.rid].result() for r in reqs]
        return results[0] if single and len(results) == 1 else results

    def encode(self, prompt: Prompt | list[Prompt] | None = None,
               input_ids: list[int] | list[list[int]] | None = None, *,
               dimensions: int | None = None, rid: str | None = None,
               image_data: Any = None, **sglang_kwargs: Any
               ) -> dict[str, Any] | list[dict[str, Any]]:
        """Embeddings (or classification / reward scores) of an embedding model
        (--is-embedding, an encoder, a classifier): {"embedding": [...], "meta_info":
        {...}} per prompt, a list for a list of prompts, as SGLang's Engine.encode.
        `dimensions` keeps the first values of a Matryoshka embedding, normalised again.
        Bad requests raise ValueError with the server's 400 message."""
        if image_data is not None:
            raise ValueError("encode: image_data is not supported yet by radixserve")
        _check_unsupported("encode", sglang_kwargs)
        dims = self.validator.check_dimensions(dimensions)
        reqs, single = self.validator.prepare_pooling(prompt, input_ids, self.tokenizer, rid)
        done: dict[str, dict[str, Any]] = {}
        with closing(self._outputs(reqs)) as outputs:
            for out, i in outputs:
                reason = out.finished_reasons[i]
                if reason is None:
                    continue
                if reason.get("type") == "abort":
                    raise InvalidRequestError(reason.get("message", "request aborted"),
                                              reason.get("param"))
                embedding = (out.embeddings[i] if out.embeddings else None) or []
                done[out.rids[i]] = encode_result(
                    out.rids[i], truncate_embedding(embedding, dims, self._normalizes()),
                    out.prompt_tokens[i], reason, out.cached_tokens[i])
        results = [done[r.rid] for r in reqs]
        return results[0] if single else results

    def _normalizes(self) -> bool:
        pooling = self.limits.pooling
        return pooling is not None and pooling.normalize

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        """Apply the model's chat template (with the generation prompt) and generate.
        OpenAI content parts {"type": "image_url" | "video_url", ...} carry images and
        videos (vision-language models)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        ids, media = [], []
        for conversation in conversations:
            template_messages, parts = chat_media(conversation)
            if parts:
                self._media().check_takes(parts)
            ids.append(self.apply_chat_template(template_messages))
            media.append(parts)
        single = conversations is not messages
        if any(media):
            _check_unsupported("chat", {k: v for k, v in kwargs.items()
                                        if k not in _CHAT_MEDIA_KWARGS})
            reqs, _ = prepare_with_media(
                self.validator, self._media(), None, ids[0] if single else ids,
                self.tokenizer, media, sampling_params,
                **{k: v for k, v in kwargs.items() if k in _CHAT_MEDIA_KWARGS})
            if kwargs.get("stream"):
                return self._stream(reqs)
            results = self._run_to_completion(reqs)
            return results[0] if single and len(results) == 1 else results
        return self.generate(input_ids=ids[0] if single else ids,
                             sampling_params=sampling_params, **kwargs)

    def _media(self) -> MediaPreparer:
        """The model's image/video processing, made on the first request that needs it."""
        if self._media_preparer is None:
            self._media_preparer = MediaPreparer(
                self.model_config.hf_config, self.model_config.model_path,
                self.server_args.multimodal_config(), self.limits)
        return self._media_preparer

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template; pass --chat-template")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def get_server_info(self) -> Any:
        with self._lock:
            return self.scheduler.get_server_info()

    def flush_cache(self) -> bool:
        with self._lock:
            return self.scheduler.flush_cache()

    # The expert-load recorder (--expert-distribution-recorder-mode), as SGLang's Engine.
    def start_expert_distribution_record(self) -> None:
        self._expert_record("start")

    def stop_expert_distribution_record(self) -> None:
        self._expert_record("stop")

    def dump_expert_distribution_record(self) -> dict[str, Any]:
        """mode, moe_layers and logical_count [layer][expert], summed over the ranks."""
        return self._expert_record("dump") or {}

    def _expert_record(self, action: str) -> dict[str, Any] | None:
        from radixserve.managers.io_struct import ExpertDistributionReq

        with self._lock:
            reply = self.scheduler.expert_distribution(ExpertDistributionReq(action))
        if not reply.success:
            raise ValueError(reply.message)
        return reply.record

    def shutdown(self) -> None:
        """Release the model and KV memory (and stop the rank processes, if any)."""
        if isinstance(self.scheduler, DataParallelController):
            self.scheduler.shutdown()
        self.scheduler = None  # type: ignore[assignment]
        self._boxes.clear()
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # --- request preparation ---------------------------------------------------------

    def _prepare(self, prompt: Any, input_ids: Any, sampling_params: Any,
                 return_logprob: bool, logprob_start_len: int | None,
                 top_logprobs_num: int | None, stream: bool,
                 rid: str | None, image_data: Any = None, video_data: Any = None,
                 data_parallel_rank: int | None = None
                 ) -> tuple[list[TokenizedGenerateReqInput], bool]:
        """The server's checks and n expansion (request_validation.py), on our limits;
        `data_parallel_rank` pins every request to that DP replica."""
        self.validator.check_generates()
        rank = self.validator.check_data_parallel_rank(data_parallel_rank,
                                                       self.server_args.dp_size)
        reqs, single = self._prepare_unpinned(prompt, input_ids, sampling_params,
                                              return_logprob, logprob_start_len,
                                              top_logprobs_num, stream, rid, image_data,
                                              video_data)
        for req in reqs:
            req.data_parallel_rank = rank
        return reqs, single

    def _prepare_unpinned(self, prompt: Any, input_ids: Any, sampling_params: Any,
                          return_logprob: bool, logprob_start_len: int | None,
                          top_logprobs_num: int | None, stream: bool, rid: str | None,
                          image_data: Any, video_data: Any
                          ) -> tuple[list[TokenizedGenerateReqInput], bool]:
        if image_data is not None or video_data is not None:
            return prepare_with_media(
                self.validator, self._media(), prompt, input_ids, self.tokenizer, None,
                sampling_params, return_logprob=return_logprob,
                logprob_start_len=logprob_start_len, top_logprobs_num=top_logprobs_num,
                stream=stream, rid=rid, image_data=image_data, video_data=video_data)
        return self.validator.prepare(
            prompt, input_ids, self.tokenizer, sampling_params,
            return_logprob=return_logprob, logprob_start_len=logprob_start_len,
            top_logprobs_num=top_logprobs_num, stream=stream, rid=rid)

    # --- driving the shared scheduler --------------------------------------------------

    def _submit(self, box: _Mailbox, reqs: list[TokenizedGenerateReqInput]) -> None:
        with self._lock:
            self._apply_aborts()
            if any(r.rid in self._boxes for r in reqs):
                raise InvalidRequestError("a request with this rid is already running", "rid")
            for r in reqs:
                self._boxes[r.rid] = box
                if self.detokenizer is not None:
                    self.detokenizer.register(r.rid, r.sampling_params.stop_strs)
                self.scheduler.add_request(r)

    def _step_for(self, box: _Mailbox) -> None:
        """Run one scheduler step, unless `box` has news already; route its outputs."""
        if self._cuda_device is not None:
            import torch

            torch.cuda.set_device(self._cuda_device)
        with self._lock:
            self._apply_aborts()
            if box.items:
                return
            out = self.scheduler.step()
            if out is None:
                if not self.scheduler.has_work():
                    raise RuntimeError(f"scheduler went idle with {len(box.pending)} "
                                       f"requests open")
                return
            str_out = self._detokenize(out)
            for i, rid in enumerate(str_out.rids):
                owner = self._boxes.get(rid)
                if owner is None:
                    continue  # aborted and forgotten
                owner.items.append((str_out, i))
                if str_out.finished_reasons[i] is not None:
                    del self._boxes[rid]
                    if out.finished_reasons[i] is None:
                        # The detokenizer ended it (a row it could not decode): the
                        # scheduler, which still runs it, must free it.
                        self.scheduler.abort_request(rid)

    def _release(self, box: _Mailbox, wait: bool) -> None:
        """The call is over (finished, failed or abandoned): abort what still runs."""
        open_rids = [rid for rid in box.rids if rid in box.pending]
        if not open_rids:
            return
        self._aborts.extend(open_rids)
        if self._lock.acquire(blocking=wait):
            try:
                self._apply_aborts()
            except Exception:  # a dead scheduler: never mask the error that ended the call
                logger.warning("could not abort %d requests", len(open_rids), exc_info=True)
            finally:
                self._lock.release()
        # else: the call that holds the lock, or the next one, applies them.

    def _apply_aborts(self) -> None:
        while self._aborts:
            rid = self._aborts.popleft()
            if self._boxes.pop(rid, None) is not None:
                self.scheduler.abort_request(rid)

    def _outputs(self, reqs: list[TokenizedGenerateReqInput]) -> Iterator[tuple[BatchStrOut, int]]:
        box = _Mailbox([r.rid for r in reqs])
        self._submit(box, reqs)
        try:
            while box.pending:
                yield from box.drain()
                if box.pending:
                    self._step_for(box)
        finally:
            self._release(box, wait=True)

    async def _aoutputs(self, reqs: list[TokenizedGenerateReqInput]
                        ) -> AsyncIterator[tuple[BatchStrOut, int]]:
        box = _Mailbox([r.rid for r in reqs])
        loop = asyncio.get_running_loop()
        step_lock = self._step_locks.setdefault(loop, asyncio.Lock())
        await asyncio.to_thread(self._submit, box, reqs)
        try:
            while box.pending:
                for item in box.drain():
                    yield item
                if box.pending:
                    # One stepping thread per loop; a call that waited here may find
                    # its outputs delivered by the step another call ran.
                    async with step_lock:
                        if not box.items:
                            await asyncio.to_thread(self._step_for, box)
        finally:
            self._release(box, wait=False)

    def _detokenize(self, out: Any) -> BatchStrOut:
        if self.detokenizer is not None:
            return self.detokenizer.handle(out)
        n = len(out.rids)
        return BatchStrOut(out.rids, [""] * n, out.new_output_ids, out.finished_reasons,
                           out.prompt_tokens, out.completion_tokens, out.cached_tokens,
                           out.output_token_logprobs, out.output_top_logprobs,
                           out.input_token_logprobs, out.input_top_logprobs,
                           spec_verify_ct=out.spec_verify_ct, embeddings=out.embeddings)

    def _run_to_completion(self, reqs: list[TokenizedGenerateReqInput]) -> list[dict[str, Any]]:
        acc = {r.rid: _Accumulator(r.rid) for r in reqs}
        with closing(self._outputs(reqs)) as outputs, progress_bar(
                len(reqs), self.server_args.disable_progress_bar) as bar:
            for out, i in outputs:
                acc[out.rids[i]].add(out, i)
                if out.finished_reasons[i] is not None:
                    bar.update(1)
        return [acc[r.rid].result() for r in reqs]

    def _stream(self, reqs: list[TokenizedGenerateReqInput]) -> Iterator[dict[str, Any]]:
        index = {r.rid: k for k, r in enumerate(reqs)}
        with closing(self._outputs(reqs)) as outputs:
            for out, i in outputs:
                yield _increment(out, i, index)

    async def _astream(self, reqs: list[TokenizedGenerateReqInput]
                       ) -> AsyncIterator[dict[str, Any]]:
        index = {r.rid: k for k, r in enumerate(reqs)}
        async with aclosing(self._aoutputs(reqs)) as outputs:
            async for out, i in outputs:
                yield _increment(out, i, index)


def _increment(out: BatchStrOut, i: int, index: dict[str, int]) -> dict[str, Any]:
    acc = _Accumulator(out.rids[i])
    acc.add(out, i)
    item = acc.result()
    item["index"] = index[out.rids[i]]
    return item


class _Accumulator:
    """Builds one request's SGLang-shaped result from its BatchStrOut pieces."""

    def __init__(self, rid: str) -> None:
        self.rid = rid
        self.text = ""
        self.output_ids: list[int] = []
        self.meta: dict[str, Any] = {"id": rid}
        self.output_token_logprobs: list | None = None
        self.output_top_logprobs: list | None = None

    def add(self, out: BatchStrOut, i: int) -> None:
        self.text += out.text_deltas[i]
        self.output_ids.extend(out.output_ids[i])
        reason = out.finished_reasons[i]
        if reason is not None and reason.get("type") == "abort" and reason.get("status_code") == 400:
            raise InvalidRequestError(reason.get("message", "invalid request"),
                                      reason.get("param"))
        self.meta.update(prompt_tokens=out.prompt_tokens[i],
                         completion_tokens=out.completion_tokens[i],
                         cached_tokens=out.cached_tokens[i], finish_reason=reason)
        self.meta.update(spec_meta(out, i))
        if out.output_token_logprobs[i] is not None:
            self.output_token_logprobs = (self.output_token_logprobs or []) + [
                list(x) for x in out.output_token_logprobs[i]]
            self.output_top_logprobs = (self.output_top_logprobs or []) + [
                [list(y) for y in x] for x in out.output_top_logprobs[i]]
            self.meta["output_token_logprobs"] = self.output_token_logprobs
            self.meta["output_top_logprobs"] = self.output_top_logprobs
        if out.input_token_logprobs[i] is not None:
            self.meta["input_token_logprobs"] = [list(x) for x in out.input_token_logprobs[i]]
            self.meta["input_top_logprobs"] = [
                None if x is None else [list(y) for y in x] for x in out.input_top_logprobs[i]]

    def result(self) -> dict[str, Any]:
        return {"text": self.text, "output_ids": list(self.output_ids), "meta_info": dict(self.meta)}
