"""Per model family: the placeholder tokens, the HF image processor, how a video
becomes patches, and the M-RoPE positions. Looked up by the config's `model_type`;
a new family registers a builder with `register_family`."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PretrainedConfig

from radixserve.multimodal.inputs import MultimodalItem
from radixserve.multimodal.loading import LoadedVideo
from radixserve.multimodal.mrope import qwen2_5_vl_rope_index

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessedItem:
    """One image or video through the processor: its rows and grid, and its
    family-specific extras (the item's offset in the prompt is not known yet)."""

    pixel_values: torch.Tensor
    grid_thw: tuple[int, int, int]
    num_tokens: int
    second_per_grid_t: float = 1.0
    extra: dict[str, Any] | None = None


@dataclass(frozen=True)
class FamilySpec:
    name: str
    image_token_id: int
    video_token_id: int | None
    process_image: Callable[[Any], ProcessedItem]  # an RGB PIL image -> its patches
    process_video: Callable[[LoadedVideo], ProcessedItem] | None
    # (prompt_len, items) -> ([3, prompt_len] positions, delta); None: no M-RoPE
    rope_index: Callable[[int, list[MultimodalItem]], tuple[torch.Tensor, int]] | None
    settings: str  # folded into item hashes: the same bytes processed otherwise differ


FamilyBuilder = Callable[[PretrainedConfig, str | None, dict[str, Any]], FamilySpec]
_FAMILIES: dict[str, FamilyBuilder] = {}


def register_family(model_type: str, builder: FamilyBuilder) -> None:
    _FAMILIES[model_type] = builder


def family_for(hf_config: PretrainedConfig, model_path: str | None,
               process_config: dict[str, Any] | None = None) -> FamilySpec | None:
    """The multimodal family of a model, or None for a text-only model.
    `process_config`: --mm-process-config ({"image": {...}, "video": {...}})."""
    builder = _FAMILIES.get(getattr(hf_config, "model_type", ""))
    if builder is None:
        return None
    return builder(hf_config, model_path, dict(process_config or {}))


# --- Qwen2-VL / Qwen2.5-VL ----------------------------------------------------------------

# The HF video processor's defaults (frames are resized within these, per frame).
_QWEN_VIDEO_MIN_PIXELS = 128 * 28 * 28
_QWEN_VIDEO_MAX_PIXELS = 768 * 28 * 28
_QWEN_VIDEO_FPS = 2.0  # frames per second sampled from sources that have a frame rate
_QWEN_MIN_FRAMES = 4


def load_image_processor(model_path: str | None, overrides: dict[str, Any]) -> Any:
    """The model folder's HF image processor (preprocessor_config.json), with
    min_pixels / max_pixels overrides; the family's defaults when the folder has none
    (dummy-weight benchmarks ship only config.json)."""
    from transformers import AutoImageProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil)

    kwargs = {k: overrides[k] for k in ("min_pixels", "max_pixels") if k in overrides}
    if model_path and os.path.isfile(os.path.join(model_path, "preprocessor_config.json")):
        return AutoImageProcessor.from_pretrained(model_path, **kwargs)
    logger.warning("%s has no preprocessor_config.json: using Qwen2-VL's default image "
                   "processor", model_path)
    return Qwen2VLImageProcessorPil(**kwargs)


def _qwen2_vl_family(hf_config: PretrainedConfig, model_path: str | None,
                     process_config: dict[str, Any]) -> FamilySpec:
    vision = hf_config.vision_config
    image_cfg = dict(process_config.get("image") or {})
    video_cfg = dict(process_config.get("video") or {})
    ip = load_image_processor(model_path, image_cfg)
    merge = int(ip.merge_size)
    if merge != int(vision.spatial_merge_size):
        raise ValueError(f"the image processor merges {merge}x{merge} patches, the vision "
                         f"tower {vision.spatial_merge_size}")
    tokens_per_second = float(getattr(vision, "tokens_per_second", 1.0) or 1.0)

    def process_image(image: Any) -> ProcessedItem:
        out = ip(images=[image], return_tensors="pt")
        grid = tuple(int(x) for x in out["image_grid_thw"][0])
        return ProcessedItem(out["pixel_values"], grid, math.prod(grid) // merge ** 2)

    video = QwenVideoPatcher(ip, int(video_cfg.get("min_pixels", _QWEN_VIDEO_MIN_PIXELS)),
                             int(video_cfg.get("max_pixels", _QWEN_VIDEO_MAX_PIXELS)),
                             float(video_cfg.get("fps", _QWEN_VIDEO_FPS)),
                             int(video_cfg.get("max_frames", 768)))

    def rope_index(prompt_len: int, items: list[MultimodalItem]) -> tuple[torch.Tensor, int]:
        return qwen2_5_vl_rope_index(prompt_len, items, merge, tokens_per_second)

    settings = repr((hf_config.model_type, dict(ip.size), ip.patch_size, merge,
                     sorted(video_cfg.items())))
    return FamilySpec(hf_config.model_type, int(hf_config.image_token_id),
                      int(hf_config.video_token_id), process_image, video, rope_index,
                      settings)


class QwenVideoPatcher:
    """A video's frames into Qwen2-VL patches, as HF's Qwen2-VL video processor lays
    them out: frames sampled at `fps` when the source has a frame rate (HF's
    sample_frames), each frame resized and normalised by the model's image processor
    within the video pixel limits, padded to a multiple of temporal_patch_size with the
    last frame, and every `temporal_patch_size` consecutive frames stacked into one
    temporal patch. (HF's own video processor needs torchvision, which is not
    installed; its resize runs on tensors, ours through the image processor's PIL path.)"""

    def __init__(self, ip: Any, min_pixels: int, max_pixels: int, fps: float,
                 max_frames: int) -> None:
        self.ip = ip
        self.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
        self.fps = fps
        self.max_frames = max_frames

    def sample(self, video: LoadedVideo) -> tuple[list[Any], float]:
        """(the frames used, their frame rate)."""
        frames, tps = video.frames, int(self.ip.temporal_patch_size)
        if video.fps is None:
            return frames[:self.max_frames], self.fps  # frames given one by one: all used
        total = len(frames)
        upper = math.floor(min(self.max_frames, total) / tps) * tps
        n = total / video.fps * self.fps
        n = math.floor(min(max(n, _QWEN_MIN_FRAMES), upper, total) / tps) * tps
        if n <= 0:
            return frames, video.fps
        idx = torch.arange(0, total, total / n).int().tolist()
        return [frames[i] for i in idx], len(idx) / (total / video.fps)

    def __call__(self, video: LoadedVideo) -> ProcessedItem:
        frames, fps = self.sample(video)
        tps = int(self.ip.temporal_patch_size)
        if len(frames) % tps:
            frames = frames + [frames[-1]] * (tps - len(frames) % tps)
        out = self.ip(images=frames, size=self.size, return_tensors="pt")
        grids = out["image_grid_thw"]
        _, h, w = (int(x) for x in grids[0])
        c, p = 3, int(self.ip.patch_size)
        # Each frame's rows repeat the frame over the temporal patch; keep one copy and
        # stack consecutive frames along that axis instead.
        rows = out["pixel_values"].view(len(frames), h * w, c, tps, p, p)[:, :, :, 0]
        rows = rows.view(len(frames) // tps, tps, h * w, c, p, p).permute(0, 2, 3, 1, 4, 5)
        grid = (len(frames) // tps, h, w)
        merge = int(self.ip.merge_size)
        return ProcessedItem(rows.reshape(grid[0] * h * w, c * tps * p * p).contiguous(),
                             grid, math.prod(grid) // merge ** 2,
                             second_per_grid_t=tps / fps)


register_family("qwen2_5_vl", _qwen2_vl_family)
