"""A prompt with images and videos into the model's token ids and MultimodalInputs.

The prompt (already tokenized: text or a chat template rendered to ids) holds one
placeholder run per item: the family's image (or video) pad token, once, as chat
templates write it (`<|vision_start|><|image_pad|><|vision_end|>`), or already
repeated as many times as the item has tokens. Each run becomes `num_tokens` pad
tokens, as HF's processors expand them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from transformers import PretrainedConfig

from radixserve.multimodal.errors import MultimodalInputError
from radixserve.multimodal.families import FamilySpec, ProcessedItem, family_for
from radixserve.multimodal.inputs import MultimodalInputs, MultimodalItem
from radixserve.multimodal.loading import LoadLimits, load_image, load_video


@dataclass(frozen=True)
class MediaPart:
    """One image or video of a request, with the name of the request part it came in."""

    modality: str  # "image" | "video"
    source: Any
    param: str


@dataclass(frozen=True)
class MultimodalLimits:
    load: LoadLimits = LoadLimits()
    # --limit-mm-data-per-request: most items of each modality in one prompt
    max_items: dict[str, int] | None = None


class MultimodalProcessor:
    """Stateless past construction: safe to call from the tokenizer thread."""

    def __init__(self, spec: FamilySpec, limits: MultimodalLimits) -> None:
        self.spec = spec
        self.limits = limits

    @classmethod
    def for_model(cls, hf_config: PretrainedConfig, model_path: str | None,
                  process_config: dict[str, Any] | None,
                  limits: MultimodalLimits) -> "MultimodalProcessor | None":
        spec = family_for(hf_config, model_path, process_config)
        return None if spec is None else cls(spec, limits)

    def process(self, ids: list[int], parts: list[MediaPart], max_len: int
                ) -> tuple[list[int], MultimodalInputs]:
        """(the expanded ids, the request's MultimodalInputs). `max_len`: the longest
        prompt the model takes; an item that makes the prompt longer is refused."""
        self._check_counts(parts)
        runs = self._runs(ids)
        for modality in ("image", "video"):
            want = [p for p in parts if p.modality == modality]
            have = [r for r in runs if r[2] == modality]
            if len(want) != len(have):
                pad = self._pad_id(modality)
                param = want[0].param if want else "prompt"
                raise MultimodalInputError(
                    f"the prompt has {len(have)} {modality} placeholder(s) (token {pad}) but "
                    f"{len(want)} {modality}(s) were given", param)
        by_modality = {m: iter([p for p in parts if p.modality == m]) for m in ("image", "video")}
        out: list[int] = []
        items: list[MultimodalItem] = []
        cursor = 0
        for start, length, modality in runs:
            part = next(by_modality[modality])
            done, raw = self._process_part(part)
            if length not in (1, done.num_tokens):
                raise MultimodalInputError(
                    f"{part.param}: its placeholder run has {length} tokens; it needs 1 or "
                    f"{done.num_tokens}", part.param)
            out.extend(ids[cursor:start])
            items.append(MultimodalItem(
                modality=modality, hash=self._hash(part, raw), pixel_values=done.pixel_values,
                grid_thw=done.grid_thw, offset=len(out), num_tokens=done.num_tokens,
                second_per_grid_t=done.second_per_grid_t, extra=dict(done.extra or {})))
            out.extend([self._pad_id(modality)] * done.num_tokens)
            cursor = start + length
            if len(out) + len(ids) - cursor > max_len:
                raise MultimodalInputError(
                    f"{part.param}: with this {modality} the prompt is "
                    f"{len(out) + len(ids) - cursor} tokens; the model takes at most "
                    f"{max_len}", part.param)
        out.extend(ids[cursor:])
        mm = MultimodalInputs(items=items, prompt_len=len(out))
        if self.spec.rope_index is not None:
            mm.mrope_positions, mm.rope_delta = self.spec.rope_index(len(out), items)
        mm.bind_prompt(out)
        return out, mm

    def _check_counts(self, parts: list[MediaPart]) -> None:
        for modality, limit in (self.limits.max_items or {}).items():
            chosen = [p for p in parts if p.modality == modality]
            if len(chosen) > limit:
                raise MultimodalInputError(
                    f"{chosen[limit].param}: at most {limit} {modality}(s) per request "
                    f"(--limit-mm-data-per-request)", chosen[limit].param)
        if any(p.modality == "video" for p in parts) and self.spec.process_video is None:
            param = next(p.param for p in parts if p.modality == "video")
            raise MultimodalInputError(f"{param}: this model does not take videos", param)

    def _pad_id(self, modality: str) -> int:
        pad = self.spec.image_token_id if modality == "image" else self.spec.video_token_id
        assert pad is not None
        return pad

    def _runs(self, ids: list[int]) -> list[tuple[int, int, str]]:
        """(start, length, modality) of every placeholder run, in prompt order."""
        kinds = {self.spec.image_token_id: "image"}
        if self.spec.video_token_id is not None:
            kinds[self.spec.video_token_id] = "video"
        runs: list[tuple[int, int, str]] = []
        i = 0
        while i < len(ids):
            kind = kinds.get(ids[i])
            if kind is None:
                i += 1
                continue
            j = i
            while j < len(ids) and ids[j] == ids[i]:
                j += 1
            runs.append((i, j - i, kind))
            i = j
        return runs

    def _process_part(self, part: MediaPart) -> tuple[ProcessedItem, bytes]:
        """The item through the processor, and the raw bytes its hash is taken of."""
        load = self.limits.load
        try:
            if part.modality == "image":
                loaded = load_image(part.source, part.param, load)
                done = self.spec.process_image(loaded.image)
            else:
                video = load_video(part.source, part.param, load)
                loaded = video
                assert self.spec.process_video is not None
                done = self.spec.process_video(video)
        except MultimodalInputError:
            raise
        except ValueError as exc:  # the processor refuses a shape (aspect ratio > 200, ...)
            raise MultimodalInputError(f"{part.param}: {exc}", part.param) from None
        return done, loaded.raw

    def _hash(self, part: MediaPart, raw: bytes) -> int:
        h = hashlib.blake2b(digest_size=8)
        h.update(part.modality.encode())
        h.update(self.spec.settings.encode())
        h.update(raw)
        return int.from_bytes(h.digest(), "little") >> 2
