"""Requests with images and videos: SGLang's `image_data` / `video_data` (or the chat
endpoint's content parts) into named media parts, and each prompt's ids expanded with
its items' placeholder tokens, before the shared validation (request_validation.py).

The HTTP server runs this in the tokenizer thread (off the event loop); the offline
Engine in the caller's thread. Both raise InvalidRequestError naming the part.
"""

from __future__ import annotations

from typing import Any, Sequence

from transformers import PretrainedConfig

from radixserve.configs.multimodal_config import MultimodalConfig
from radixserve.managers.io_struct import TokenizedGenerateReqInput
from radixserve.managers.request_validation import (InvalidRequestError, ModelLimits,
                                                    RequestValidator, parse_prompts,
                                                    tokenize_prompts)
from radixserve.multimodal.errors import MultimodalInputError
from radixserve.multimodal.inputs import MultimodalInputs
from radixserve.multimodal.loading import LoadLimits
from radixserve.multimodal.processor import MediaPart, MultimodalLimits, MultimodalProcessor

MediaList = list[MediaPart]


class MediaPreparer:
    """The model's multimodal processor (None for a text-only model), bound to the
    limits of the context and the KV cache."""

    def __init__(self, hf_config: PretrainedConfig, model_path: str | None,
                 config: MultimodalConfig, limits: ModelLimits) -> None:
        load = LoadLimits(max_bytes=config.max_input_bytes, max_pixels=config.max_image_pixels,
                          allow_http=config.allow_http, timeout_s=config.fetch_timeout_s)
        self.processor = MultimodalProcessor.for_model(
            hf_config, model_path, config.process_config,
            MultimodalLimits(load, dict(config.max_items)))
        # The prompt must leave one token to generate, in the context and the KV cache.
        self.max_len = max(1, min(limits.context_len - 1, limits.max_total_num_tokens - 1))

    def check_takes(self, parts: MediaList) -> None:
        """Refuse media for a text-only model (before its chat template sees them)."""
        if parts and self.processor is None:
            raise InvalidRequestError(f"{parts[0].param}: this model takes text only",
                                      parts[0].param)

    def expand(self, ids: list[int], parts: MediaList) -> tuple[list[int], MultimodalInputs]:
        self.check_takes(parts)
        try:
            return self.processor.process(ids, parts, self.max_len)
        except MultimodalInputError as exc:
            raise InvalidRequestError(exc.message, exc.param) from None


def media_from_sglang(image_data: Any, video_data: Any, num_prompts: int,
                      batched: bool) -> list[MediaList]:
    """Per prompt, its media parts from SGLang's fields: for one prompt a payload or a
    list of payloads; for a batch of prompts a list with one entry per prompt (each a
    payload, a list, or null). A video is a payload or a list of frames, so a single
    prompt's video_data list is read as several videos only when its entries are lists."""
    per_prompt: list[MediaList] = [[] for _ in range(num_prompts)]
    for name, data, modality in (("image_data", image_data, "image"),
                                 ("video_data", video_data, "video")):
        if data is None:
            continue
        if batched:
            if not isinstance(data, list) or len(data) != num_prompts:
                raise InvalidRequestError(f"{name} must be a list with one entry per prompt "
                                          f"({num_prompts})", name)
            for i, entry in enumerate(data):
                per_prompt[i] += _parts(entry, f"{name}[{i}]", modality)
        else:
            per_prompt[0] += _parts(data, name, modality)
    return per_prompt


def _parts(entry: Any, param: str, modality: str) -> MediaList:
    if entry is None:
        return []
    if isinstance(entry, list):
        if modality == "video" and not any(isinstance(e, list) for e in entry):
            return [MediaPart(modality, entry, param)]  # one video given as its frames
        return [MediaPart(modality, e, f"{param}[{j}]") for j, e in enumerate(entry)
                if e is not None]
    return [MediaPart(modality, entry, param)]


def prepare_with_media(validator: RequestValidator, preparer: MediaPreparer,
                       text: Any, input_ids: Any, tokenizer: Any,
                       media: Sequence[MediaList] | None, sampling_params: Any = None,
                       **build_kwargs: Any) -> tuple[list[TokenizedGenerateReqInput], bool]:
    """RequestValidator.prepare for prompts that carry media: `media` per prompt, or
    None to read them from build_kwargs' image_data / video_data (SGLang's fields)."""
    image_data = build_kwargs.pop("image_data", None)
    video_data = build_kwargs.pop("video_data", None)
    prompts, single = parse_prompts(text, input_ids)
    if media is None:
        media = media_from_sglang(image_data, video_data, len(prompts), not single)
    if len(media) != len(prompts):
        raise InvalidRequestError(f"{len(media)} media lists for {len(prompts)} prompts",
                                  "image_data")
    tokenized = tokenize_prompts(prompts, tokenizer,
                                 validator.request_limits.max_prompt_bytes)
    expanded, mms = [], []
    for (prompt_text, ids), parts in zip(tokenized, media):
        mm = None
        if parts:
            ids, mm = preparer.expand(ids, list(parts))
        expanded.append((prompt_text, ids))
        mms.append(mm)
    reqs = validator.build(expanded, sampling_params, mm_inputs=mms, **build_kwargs)
    return reqs, single


def chat_media(messages: list[dict[str, Any]], prefix: str = "messages"
               ) -> tuple[list[dict[str, Any]], MediaList]:
    """OpenAI chat messages (plain dicts) into the messages a VL chat template reads
    (content parts {"type": "text"}, {"type": "image"}, {"type": "video"}, as
    transformers' templates take them) and the media parts, named
    `messages[i].content[j].image_url`. Messages without media are returned unchanged."""
    out: list[dict[str, Any]] = []
    parts: MediaList = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list) or not any(
                isinstance(p, dict) and p.get("type") != "text" for p in content):
            out.append(message)
            continue
        rendered: list[dict[str, Any]] = []
        for j, part in enumerate(content):
            where = f"{prefix}[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                rendered.append({"type": "text", "text": str(part.get("text", ""))})
            elif kind in ("image_url", "video_url"):
                modality = kind.split("_")[0]
                value = part.get(kind)
                source = value.get("url") if isinstance(value, dict) else value
                if source is None:
                    raise InvalidRequestError(f"{where}.{kind}: needs a url", f"{where}.{kind}")
                rendered.append({"type": modality})
                parts.append(MediaPart(modality, source, f"{where}.{kind}"))
            else:
                raise InvalidRequestError(
                    f"{where}.type: unsupported content part type {kind!r} (text, image_url "
                    f"and video_url are)", f"{where}.type")
        out.append({**message, "content": rendered})
    return out, parts
