"""The offline Engine: generate from Python without a server.

It runs the same Scheduler and Detokenizer classes as the server, in this process:
the server puts each in its own process only so that HTTP handling, tokenization and
the GPU loop overlap. Results are identical because the scheduling code is the same.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import Any

from radixserve.managers.data_parallel_controller import (DataParallelController,
                                                         launch_engine_replicas)
from radixserve.managers.detokenizer_manager import Detokenizer
from radixserve.managers.io_struct import BatchStrOut, TokenizedGenerateReqInput
from radixserve.managers.scheduler import Scheduler
from radixserve.sampling_params import SamplingParams
from radixserve.server_args import ServerArgs

logger = logging.getLogger(__name__)

Prompt = str | list[int]


class Engine:
    """`Engine(model_path=None, **server_args)`; see ServerArgs for the settings."""

    def __init__(self, model_path: str | None = None, **kwargs: Any) -> None:
        self.server_args = ServerArgs(model_path=model_path, **kwargs)
        self.scheduler: Scheduler | DataParallelController
        if self.server_args.tp_size == 1 and self.server_args.dp_size == 1:
            self.scheduler = Scheduler(self.server_args)
        else:
            # Each TP rank of each DP replica runs in a process of its own (distributed/).
            self.scheduler = launch_engine_replicas(self.server_args)
        self.tokenizer = self.scheduler.tokenizer
        self.model_config = self.scheduler.model_config
        self.detokenizer = Detokenizer(self.tokenizer) if self.tokenizer is not None else None

    # --- public API ---------------------------------------------------------------

    def generate(self, prompt: Prompt | list[Prompt] | None = None,
                 sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None,
                 input_ids: list[int] | list[list[int]] | None = None,
                 return_logprob: bool = False, logprob_start_len: int | None = None,
                 top_logprobs_num: int = 0,
                 stream: bool = False) -> dict[str, Any] | list[dict[str, Any]] | Iterator[dict]:
        """SGLang-shaped results: {"text", "output_ids", "meta_info"} per prompt (and per
        sample when n > 1). A single prompt gives a dict, a list gives a list. With
        stream=True, yields increments {"text": delta, "output_ids": new ids, ...}."""
        prompts, single = self._normalize_prompts(prompt, input_ids)
        params_list = self._normalize_params(sampling_params, len(prompts))
        reqs = self._tokenize(prompts, params_list, return_logprob, logprob_start_len,
                              top_logprobs_num, stream)
        if stream:
            return self._stream(reqs)
        results = self._run_to_completion(reqs)
        return results[0] if single and len(results) == 1 else results

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        """Apply the model's chat template (with the generation prompt) and generate."""
        if messages and isinstance(messages[0], dict):
            return self.generate(input_ids=self.apply_chat_template(messages),
                                 sampling_params=sampling_params, **kwargs)
        return self.generate(input_ids=[self.apply_chat_template(m) for m in messages],
                             sampling_params=sampling_params, **kwargs)

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template; pass --chat-template")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def get_server_info(self) -> Any:
        return self.scheduler.get_server_info()

    def flush_cache(self) -> bool:
        return self.scheduler.flush_cache()

    def shutdown(self) -> None:
        """Release the model and KV memory (and stop the rank processes, if any)."""
        if isinstance(self.scheduler, DataParallelController):
            self.scheduler.shutdown()
        self.scheduler = None  # type: ignore[assignment]
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

    @staticmethod
    def _normalize_prompts(prompt: Any, input_ids: Any) -> tuple[list[Prompt], bool]:
        if (prompt is None) == (input_ids is None):
            raise ValueError("give exactly one of prompt or input_ids")
        if prompt is not None:
            if isinstance(prompt, str):
                return [prompt], True
            if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
                return list(prompt), False
            raise ValueError("prompt must be a string or a list of strings")
        if isinstance(input_ids, list) and all(isinstance(t, int) for t in input_ids):
            return [list(input_ids)], True
        if isinstance(input_ids, list) and all(
                isinstance(x, list) and all(isinstance(t, int) for t in x) for x in input_ids):
            return [list(x) for x in input_ids], False
        raise ValueError("input_ids must be a list of ints or a list of lists of ints")

    def _normalize_params(self, params: Any, n: int) -> list[SamplingParams]:
        if isinstance(params, list):
            if len(params) != n:
                raise ValueError(f"sampling_params has {len(params)} entries for {n} prompts")
            dicts = params
        else:
            dicts = [params] * n
        out = []
        for d in dicts:
            if isinstance(d, SamplingParams):
                sp = d
            else:
                merged = {**self.model_config.generation_defaults, **(d or {})}
                sp = SamplingParams.from_dict(merged)
            sp.verify()
            sp.normalize()
            out.append(sp)
        return out

    def _tokenize(self, prompts: list[Prompt], params: list[SamplingParams],
                  return_logprob: bool, logprob_start_len: int | None, top_logprobs_num: int,
                  stream: bool) -> list[TokenizedGenerateReqInput]:
        if top_logprobs_num < 0:
            raise ValueError(f"top_logprobs_num must be >= 0, got {top_logprobs_num}")
        reqs = []
        for prompt, sp in zip(prompts, params):
            if isinstance(prompt, str):
                if self.tokenizer is None:
                    raise ValueError("text prompts need a tokenizer (skip_tokenizer_init is set)")
                ids = self.tokenizer.encode(prompt)
                text = prompt
            else:
                ids, text = prompt, None
            self.scheduler.validate_request(ids, sp.max_new_tokens)
            start = -1 if logprob_start_len is None else logprob_start_len
            for k in range(sp.n):
                reqs.append(TokenizedGenerateReqInput(
                    rid=uuid.uuid4().hex, input_text=text, input_ids=list(ids),
                    sampling_params=sp.copy_with_seed_offset(k) if sp.n > 1 else sp,
                    return_logprob=return_logprob,
                    logprob_start_len=start if return_logprob else -1,
                    top_logprobs_num=top_logprobs_num, stream=stream))
        return reqs

    # --- running ------------------------------------------------------------------

    def _steps(self, reqs: list[TokenizedGenerateReqInput]) -> Iterator[BatchStrOut]:
        for r in reqs:
            if self.detokenizer is not None:
                self.detokenizer.register(r.rid, r.sampling_params.stop_strs)
            self.scheduler.add_request(r)
        pending = {r.rid for r in reqs}
        while pending:
            out = self.scheduler.step()
            if out is None:
                if not self.scheduler.has_work():
                    raise RuntimeError(f"scheduler went idle with {len(pending)} requests open")
                continue
            str_out = self._detokenize(out)
            for rid, reason in zip(str_out.rids, str_out.finished_reasons):
                if reason is not None:
                    pending.discard(rid)
            yield str_out

    def _detokenize(self, out: Any) -> BatchStrOut:
        if self.detokenizer is not None:
            return self.detokenizer.handle(out)
        n = len(out.rids)
        return BatchStrOut(out.rids, [""] * n, out.new_output_ids, out.finished_reasons,
                           out.prompt_tokens, out.completion_tokens, out.cached_tokens,
                           out.output_token_logprobs, out.output_top_logprobs,
                           out.input_token_logprobs, out.input_top_logprobs)

    def _run_to_completion(self, reqs: list[TokenizedGenerateReqInput]) -> list[dict[str, Any]]:
        acc = {r.rid: _Accumulator(r.rid) for r in reqs}
        for out in self._steps(reqs):
            for i, rid in enumerate(out.rids):
                if rid in acc:
                    acc[rid].add(out, i)
        return [acc[r.rid].result() for r in reqs]

    def _stream(self, reqs: list[TokenizedGenerateReqInput]) -> Iterator[dict[str, Any]]:
        index = {r.rid: k for k, r in enumerate(reqs)}
        for out in self._steps(reqs):
            for i, rid in enumerate(out.rids):
                if rid not in index:
                    continue
                acc = _Accumulator(rid)
                acc.add(out, i)
                item = acc.result()
                item["index"] = index[rid]
                yield item


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
            raise ValueError(reason.get("message", "invalid request"))
        self.meta.update(prompt_tokens=out.prompt_tokens[i],
                         completion_tokens=out.completion_tokens[i],
                         cached_tokens=out.cached_tokens[i], finish_reason=reason)
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
