"""One request validation path for every entry point.

The HTTP server (TokenizerManager), the offline Engine (generate / async_generate) and
the Scheduler (a last-line check on what arrives over IPC) all check requests with the
same `RequestValidator`, built from the same `ModelLimits`. So the same bad request
gives the same error (message and param) everywhere; the Engine raises it as the
ValueError it is (InvalidRequestError subclasses ValueError), the server answers 400
naming `param`.

The rules:
  * the model's generation defaults (generation_config.json: temperature, top_p, top_k,
    min_p, repetition_penalty) apply under the request's own sampling values;
  * top_logprobs_num is an integer in [0, MAX_TOP_LOGPROBS];
  * the RequestLimits (flags): n, the number of stop strings and stop token ids, the
    entries of logit_bias, and a text prompt's size in bytes (checked before it is
    tokenized);
  * float sampling values are finite, the flags (skip_special_tokens, ...) are bools,
    logit_bias maps token ids inside the vocabulary to biases in [-100, 100];
  * a prompt is non-empty, its ids lie in [0, vocab_size), it is shorter than the
    context length, and it fits the KV cache with one token to spare;
  * with return_logprob, logprob_start_len is smaller than the prompt length;
  * max_new_tokens: an explicit value larger than the room left in the context is an
    error; a missing one is the default (128) clipped to that room; an explicit null
    means the room (OpenAI's meaning of a missing max_tokens), and min_new_tokens is
    then checked against the room, not against the default;
  * an embedding or score request (a pooling model's, `prepare_pooling`) takes the same
    prompt checks, except that its prompt may fill the whole context (nothing is
    generated after it); `dimensions` lies in [1, the embedding size] (and among the
    config's `matryoshka_dimensions` when it lists them); a generating model refuses
    such requests, and a pooling model generation requests (`check_generates`).

This module imports neither torch nor the model code: the API server process uses it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Sequence

from radixserve.configs.pooling_config import PoolingConfig
from radixserve.configs.request_limits import RequestLimits
from radixserve.core.sampling_params import SamplingParams
from radixserve.managers.io_struct import TokenizedGenerateReqInput

if TYPE_CHECKING:
    from radixserve.configs.model_config import ModelConfig

MAX_TOP_LOGPROBS = 20
_SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)}
# Keys whose explicit None still means something (not "use the default").
_NONE_MEANS_SOMETHING = {"max_new_tokens", "stop", "seed"}

Prompt = tuple[str | None, list[int]]  # (text if given as text, token ids)


class InvalidRequestError(ValueError):
    """A client error: the HTTP layer answers 400 with `param` as the field name."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True)
class ModelLimits:
    """What validation needs to know about the model and the KV cache."""

    context_len: int
    vocab_size: int
    max_total_num_tokens: int
    eos_token_ids: tuple[int, ...] = ()
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    # An embedding / classification / reward model's pooling; None: it generates.
    pooling: PoolingConfig | None = None

    def to_model_info(self) -> dict[str, Any]:
        """The plain dict the server's scheduler process reports at startup."""
        return {"context_len": self.context_len, "vocab_size": self.vocab_size,
                "max_total_num_tokens": self.max_total_num_tokens,
                "eos_token_ids": list(self.eos_token_ids),
                "generation_defaults": dict(self.generation_defaults),
                "pooling": None if self.pooling is None else self.pooling.to_dict()}

    @classmethod
    def from_model_info(cls, info: dict[str, Any]) -> "ModelLimits":
        pooling = info.get("pooling")
        return cls(context_len=int(info["context_len"]), vocab_size=int(info["vocab_size"]),
                   max_total_num_tokens=int(info["max_total_num_tokens"]),
                   eos_token_ids=tuple(int(t) for t in info.get("eos_token_ids") or ()),
                   generation_defaults=dict(info.get("generation_defaults") or {}),
                   pooling=None if pooling is None else PoolingConfig.from_dict(pooling))


def limits_from(model_config: "ModelConfig", max_total_num_tokens: int) -> ModelLimits:
    """ModelLimits of a model served with a KV cache of `max_total_num_tokens` tokens."""
    return ModelLimits(
        context_len=int(model_config.context_len),
        vocab_size=int(model_config.vocab_size),
        max_total_num_tokens=int(max_total_num_tokens),
        eos_token_ids=tuple(sorted(int(t) for t in (model_config.eos_token_ids or ()))),
        generation_defaults=dict(model_config.generation_defaults or {}),
        pooling=model_config.pooling,
    )


def parse_prompts(text: Any, input_ids: Any) -> tuple[list[str] | list[list[int]], bool]:
    """Check the shape of text / input_ids: (the prompts, whether a single one was given)."""
    if (text is None) == (input_ids is None):
        raise InvalidRequestError("exactly one of text (prompt) and input_ids must be given",
                                  "text")
    if text is not None:
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, list) or not texts or not all(
                isinstance(t, str) for t in texts):
            raise InvalidRequestError("text must be a string or a non-empty list of strings",
                                      "text")
        return list(texts), isinstance(text, str)
    ids = input_ids
    single = not (isinstance(ids, list) and ids and isinstance(ids[0], list))
    batch = [ids] if single else ids
    for seq in batch:
        if not isinstance(seq, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in seq):
            raise InvalidRequestError(
                "input_ids must be a list of integers or a list of such lists", "input_ids")
    return [list(seq) for seq in batch], single


def check_prompt_bytes(text: str, max_bytes: int, param: str = "text") -> None:
    """Refuse a text prompt larger than --max-prompt-bytes before tokenizing it."""
    # Every character is 1-4 bytes in UTF-8: most prompts are decided without encoding.
    if len(text) * 4 <= max_bytes:
        return
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise InvalidRequestError(f"the prompt is {size} bytes; the limit is {max_bytes} "
                                  f"(--max-prompt-bytes)", param)


def tokenize_prompts(prompts: Sequence[str] | Sequence[list[int]], tokenizer: Any,
                     max_prompt_bytes: int | None = None) -> list[Prompt]:
    """(text, ids) per prompt; text prompts need a tokenizer."""
    out: list[Prompt] = []
    for p in prompts:
        if isinstance(p, str):
            if tokenizer is None:
                raise InvalidRequestError("text needs a tokenizer (skip_tokenizer_init is "
                                          "set); send input_ids", "text")
            if max_prompt_bytes is not None:
                check_prompt_bytes(p, max_prompt_bytes)
            out.append((p, list(tokenizer.encode(p))))
        else:
            out.append((None, list(p)))
    return out


class RequestValidator:
    """Checks requests against one model's limits and builds what the scheduler runs."""

    def __init__(self, limits: ModelLimits, request_limits: RequestLimits | None = None) -> None:
        self.limits = limits
        self.request_limits = request_limits or RequestLimits()

    # --- whole requests -----------------------------------------------------------

    def prepare(self, text: Any, input_ids: Any, tokenizer: Any,
                sampling_params: Any = None, *, return_logprob: bool = False,
                logprob_start_len: int | None = None, top_logprobs_num: int | None = 0,
                stream: bool = False, rid: str | None = None,
                ) -> tuple[list[TokenizedGenerateReqInput], bool]:
        """parse_prompts + tokenize_prompts + build; also says whether one prompt was
        given (an n > 1 request still gives several outputs)."""
        prompts, single = parse_prompts(text, input_ids)
        reqs = self.build(tokenize_prompts(prompts, tokenizer,
                                           self.request_limits.max_prompt_bytes),
                          sampling_params,
                          return_logprob=return_logprob, logprob_start_len=logprob_start_len,
                          top_logprobs_num=top_logprobs_num, stream=stream, rid=rid)
        return reqs, single

    def build(self, prompts: Sequence[Prompt], sampling_params: Any = None, *,
              return_logprob: bool = False, logprob_start_len: int | None = None,
              top_logprobs_num: int | None = 0, stream: bool = False,
              rid: str | None = None, mm_inputs: Sequence[Any] | None = None
              ) -> list[TokenizedGenerateReqInput]:
        """Validate tokenized prompts with their sampling params (a dict, a
        SamplingParams, None, or a list of those, one per prompt) and expand n.
        `mm_inputs`: per prompt, its images and videos (multimodal/), or None.

        rids: `rid` (a fresh uuid when None) for a single output, else
        f"{rid}-{index}" with index = running count over prompts and their n samples.
        Sample j of a prompt has its seed offset by j.
        """
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(prompts):
                raise InvalidRequestError(f"sampling_params has {len(sampling_params)} entries "
                                          f"for {len(prompts)} prompts", "sampling_params")
            raw_list = list(sampling_params)
        else:
            raw_list = [sampling_params] * len(prompts)
        parsed = [self.sampling_params(raw) for raw in raw_list]
        top = self.check_top_logprobs_num(top_logprobs_num)
        start = self.check_logprob_start_len(logprob_start_len) if return_logprob else -1
        if rid is not None and not isinstance(rid, str):
            raise InvalidRequestError("rid must be a string", "rid")
        base_rid = rid or uuid.uuid4().hex
        total = sum(params.n for params, _ in parsed)
        reqs: list[TokenizedGenerateReqInput] = []
        media = list(mm_inputs) if mm_inputs is not None else [None] * len(prompts)
        for (text, ids), (params, budget), mm in zip(prompts, parsed, media):
            self.check_prompt_ids(ids)
            req_params = self.fit_max_new_tokens(params, len(ids), budget)
            if return_logprob and start >= len(ids):
                raise InvalidRequestError(
                    f"logprob_start_len ({start}) must be smaller than the "
                    f"prompt length ({len(ids)})", "logprob_start_len")
            for j in range(params.n):
                index = len(reqs)
                reqs.append(TokenizedGenerateReqInput(
                    rid=base_rid if total == 1 else f"{base_rid}-{index}",
                    input_text=text,
                    input_ids=list(ids),
                    sampling_params=req_params.copy_with_seed_offset(j),
                    return_logprob=bool(return_logprob),
                    logprob_start_len=start,
                    top_logprobs_num=top,
                    stream=bool(stream),
                    mm_inputs=mm,
                ))
        return reqs

    def check_tokenized(self, req: Any) -> None:
        """The scheduler's last-line check of a request that arrived over IPC: every
        field's type and range, as build() would have made them. A message that did not
        come from build() (a bug, another version, a stray writer on the socket) is
        refused here, for its own request alone, instead of failing inside the step."""
        if not isinstance(req, TokenizedGenerateReqInput):
            raise InvalidRequestError(f"not a request: {type(req).__name__}", None)
        if not isinstance(req.rid, str):
            raise InvalidRequestError("rid must be a string", "rid")
        if req.input_text is not None and not isinstance(req.input_text, str):
            raise InvalidRequestError("input_text must be a string or null", "text")
        if not isinstance(req.input_ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in req.input_ids):
            raise InvalidRequestError("input_ids must be a list of integers", "input_ids")
        for name in ("return_logprob", "stream"):
            if not isinstance(getattr(req, name), bool):
                raise InvalidRequestError(f"{name} must be true or false", name)
        self.check_top_logprobs_num(req.top_logprobs_num)
        self.check_logprob_start_len(req.logprob_start_len)
        if req.data_parallel_rank is not None and (
                not isinstance(req.data_parallel_rank, int)
                or isinstance(req.data_parallel_rank, bool) or req.data_parallel_rank < 0):
            raise InvalidRequestError("data_parallel_rank must be a non-negative integer",
                                      "data_parallel_rank")
        self.check_bootstrap(req.bootstrap_host, req.bootstrap_port, req.bootstrap_room)
        self._check_sent_params(req.sampling_params)
        # A prefill-only request (embeddings, scores) may fill the whole context.
        self.check_prompt_ids(req.input_ids,
                              generating=req.sampling_params.max_new_tokens != 0)
        if req.mm_inputs is not None:
            from radixserve.multimodal.checks import check_mm_inputs
            from radixserve.multimodal.errors import MultimodalInputError

            try:
                check_mm_inputs(req.mm_inputs, req.input_ids)
            except MultimodalInputError as exc:
                raise InvalidRequestError(exc.message, exc.param) from None

    def is_well_formed(self, req: Any) -> bool:
        try:
            self.check_tokenized(req)
        except InvalidRequestError:
            return False
        return True

    def _check_sent_params(self, params: Any) -> None:
        """The SamplingParams of a request on its way to the scheduler, normalized."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("sampling_params must be SamplingParams",
                                      "sampling_params")
        try:
            params.verify()
        except (TypeError, ValueError) as exc:
            raise _sampling_error(exc) from exc
        for name in ("json_schema", "regex", "ebnf"):
            if getattr(params, name) is not None and not isinstance(getattr(params, name), str):
                raise InvalidRequestError(f"{name} must be a string", name)
        if not isinstance(params.stop_strs, list) or not all(
                isinstance(x, str) and x for x in params.stop_strs) or not isinstance(
                params.stop_str_max_len, int) or params.stop_str_max_len < max(
                map(len, params.stop_strs), default=0):
            raise InvalidRequestError("stop strings were not normalized", "stop")
        if params.n != 1:
            raise InvalidRequestError("n must be expanded before the scheduler", "n")
        vocab = self.limits.vocab_size
        if params.logit_bias is not None and not all(
                isinstance(t, int) and 0 <= t < vocab for t in params.logit_bias):
            raise InvalidRequestError("logit_bias must map token ids in the vocabulary",
                                      "logit_bias")

    # --- pooling models (embeddings, scores) ---------------------------------------

    def check_generates(self) -> None:
        """Refuse a generation request on a model that returns vectors."""
        if self.limits.pooling is not None:
            raise InvalidRequestError(
                "this model returns embeddings or scores, not text: /generate, completions "
                "and chat are not served; use /v1/embeddings, /encode or /classify", "model")

    def prepare_pooling(self, text: Any, input_ids: Any, tokenizer: Any,
                        rid: str | None = None
                        ) -> tuple[list[TokenizedGenerateReqInput], bool]:
        """An embedding / classify request: each prompt checked as for generation (but
        it may fill the whole context, as nothing is generated), run as a prefill with
        max_new_tokens 0. Also says whether one prompt was given."""
        if self.limits.pooling is None:
            raise InvalidRequestError("this model generates text; embeddings and scores "
                                      "need an embedding model (--is-embedding) or a "
                                      "classification / reward model", "model")
        prompts, single = parse_prompts(text, input_ids)
        if rid is not None and not isinstance(rid, str):
            raise InvalidRequestError("rid must be a string", "rid")
        base_rid = rid or uuid.uuid4().hex
        reqs: list[TokenizedGenerateReqInput] = []
        tokenized = tokenize_prompts(prompts, tokenizer, self.request_limits.max_prompt_bytes)
        for i, (prompt_text, ids) in enumerate(tokenized):
            self.check_prompt_ids(ids, generating=False)
            reqs.append(TokenizedGenerateReqInput(
                rid=base_rid if len(tokenized) == 1 else f"{base_rid}-{i}",
                input_text=prompt_text, input_ids=list(ids),
                sampling_params=SamplingParams(max_new_tokens=0)))
        return reqs, single

    def check_dimensions(self, value: Any) -> int | None:
        """`dimensions` (Matryoshka truncation): None, or a size the model allows."""
        if value is None:
            return None
        pooling = self.limits.pooling
        if pooling is None or pooling.task != "embed":
            raise InvalidRequestError("dimensions applies to embedding models only",
                                      "dimensions")
        if not isinstance(value, int) or isinstance(value, bool) or not (
                1 <= value <= pooling.output_dim):
            raise InvalidRequestError(f"dimensions must be an integer in [1, "
                                      f"{pooling.output_dim}] (the model's embedding size), "
                                      f"got {value!r}", "dimensions")
        allowed = pooling.matryoshka_dimensions
        if allowed is not None and value not in allowed:
            raise InvalidRequestError(f"dimensions must be one of the model's "
                                      f"matryoshka_dimensions {list(allowed)}, got {value}",
                                      "dimensions")
        return value

    # --- pieces -------------------------------------------------------------------

    def check_prompt_ids(self, ids: list[int], generating: bool = True) -> None:
        """`generating`: at least one position must be left for output."""
        lim = self.limits
        if not ids:
            raise InvalidRequestError("the prompt is empty: give at least one token", "prompt")
        bad = [t for t in ids if not 0 <= t < lim.vocab_size]
        if bad:
            raise InvalidRequestError(f"input_ids contains token ids outside "
                                      f"[0, {lim.vocab_size}): {bad[:5]}", "input_ids")
        if not generating and len(ids) > lim.context_len:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens; the model's context length is "
                f"{lim.context_len}", "prompt")
        if generating and len(ids) >= lim.context_len:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens; the model's context length is "
                f"{lim.context_len} (at least one token must be left to generate)", "prompt")
        if len(ids) + 1 > lim.max_total_num_tokens:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens but the KV cache holds only "
                f"{lim.max_total_num_tokens}; raise --max-total-tokens", "prompt")

    @staticmethod
    def check_data_parallel_rank(value: Any, dp_size: int) -> int | None:
        """None, or the replica in [0, dp_size) a request must run on."""
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < dp_size:
            raise InvalidRequestError(
                f"data_parallel_rank must be an integer in [0, {dp_size - 1}] (--dp-size "
                f"{dp_size}), got {value!r}", "data_parallel_rank")
        return value

    @staticmethod
    def check_bootstrap(host: Any, port: Any, room: Any) -> None:
        """The disaggregation fields: all unset, or a host, a port and a room."""
        if host is None and port is None and room is None:
            return
        if not isinstance(host, str) or not host:
            raise InvalidRequestError("bootstrap_host must be a non-empty string",
                                      "bootstrap_host")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise InvalidRequestError("bootstrap_port must be a port number (1-65535)",
                                      "bootstrap_port")
        if not isinstance(room, int) or isinstance(room, bool) or not 0 <= room < 1 << 63:
            raise InvalidRequestError("bootstrap_room must be an integer in [0, 2^63)",
                                      "bootstrap_room")

    def check_top_logprobs_num(self, value: Any) -> int:
        if value is None:
            return 0
        if not isinstance(value, int) or isinstance(value, bool) or not (
                0 <= value <= MAX_TOP_LOGPROBS):
            raise InvalidRequestError(
                f"top_logprobs_num must be an integer in [0, {MAX_TOP_LOGPROBS}], "
                f"got {value!r}", "top_logprobs_num")
        return value

    def check_logprob_start_len(self, value: Any) -> int:
        """-1 (or None): no prompt logprobs; else the first prompt position to score."""
        if value is None:
            return -1
        if not isinstance(value, int) or isinstance(value, bool) or value < -1:
            raise InvalidRequestError(
                f"logprob_start_len must be an integer >= -1, got {value!r}",
                "logprob_start_len")
        return value

    def sampling_params(self, raw: Any) -> tuple[SamplingParams, str]:
        """Parse and check (the model's generation defaults under the request's values);
        also say where max_new_tokens came from: "explicit", "default", or "room" (an
        explicit null)."""
        if isinstance(raw, SamplingParams):
            params = raw.copy_with_seed_offset(0)
            params.n = raw.n
            return self._checked(params), "explicit"
        if raw is not None and not isinstance(raw, dict):
            raise InvalidRequestError("sampling_params must be an object", "sampling_params")
        raw = dict(raw or {})
        if "max_new_tokens" not in raw:
            budget = "default"
        else:
            budget = "room" if raw["max_new_tokens"] is None else "explicit"
        # A null means "not given" (except where null has a meaning of its own), so the
        # model's default applies under it.
        given = {k: v for k, v in raw.items() if v is not None or k in _NONE_MEANS_SOMETHING}
        merged = {**self.limits.generation_defaults, **given}
        if budget == "room":
            # Checked against the whole context here (min_new_tokens may exceed the
            # default of 128); fit_max_new_tokens cuts it to what the prompt leaves.
            merged["max_new_tokens"] = self.limits.context_len
        try:
            params = SamplingParams.from_dict(merged)
        except (TypeError, ValueError) as exc:
            raise _sampling_error(exc) from exc
        return self._checked(params), budget

    def fit_max_new_tokens(self, params: SamplingParams, prompt_len: int,
                           budget: str) -> SamplingParams:
        context_len = self.limits.context_len
        room = context_len - prompt_len
        if budget == "explicit" and params.max_new_tokens > room:
            raise InvalidRequestError(
                f"max_new_tokens ({params.max_new_tokens}) is more than the "
                f"{room} tokens left in the context ({context_len}) after the "
                f"{prompt_len}-token prompt", "max_new_tokens")
        if budget == "explicit" or (budget == "default" and params.max_new_tokens <= room):
            return params
        fitted = params.copy_with_seed_offset(0)
        fitted.n = params.n
        fitted.max_new_tokens = room
        fitted.min_new_tokens = min(fitted.min_new_tokens, room)
        return fitted

    def _checked(self, params: SamplingParams) -> SamplingParams:
        rl = self.request_limits
        # Counted before verify() walks them.
        if params.n is not None and isinstance(params.n, int) and params.n > rl.max_n:
            raise InvalidRequestError(f"n must be at most {rl.max_n}, got {params.n} "
                                      f"(--max-n)", "n")
        for name in ("stop", "stop_token_ids"):
            value = getattr(params, name)
            if isinstance(value, list) and len(value) > rl.max_stop_strings:
                raise InvalidRequestError(f"{name} has {len(value)} entries; the limit is "
                                          f"{rl.max_stop_strings} (--max-stop-strings)", name)
        bias = params.logit_bias
        if isinstance(bias, dict) and len(bias) > rl.max_logit_bias_entries:
            raise InvalidRequestError(f"logit_bias has {len(bias)} entries; the limit is "
                                      f"{rl.max_logit_bias_entries} (--max-logit-bias-entries)",
                                      "logit_bias")
        try:
            params.verify()
            params.normalize()
        except (TypeError, ValueError) as exc:
            raise _sampling_error(exc) from exc
        vocab = self.limits.vocab_size
        outside = [t for t in params.logit_bias or () if not 0 <= t < vocab]
        if outside:
            raise InvalidRequestError(f"logit_bias has token ids outside [0, {vocab}): "
                                      f"{outside[:5]}", "logit_bias")
        return params


def _sampling_error(exc: Exception) -> InvalidRequestError:
    message = str(exc)
    name = message.split(" ", 1)[0].rstrip(":")
    return InvalidRequestError(message, name if name in _SAMPLING_FIELDS else "sampling_params")
