"""Loading image and video payloads: `data:` URLs, base64 strings, local paths, raw
bytes, PIL images, and http(s) URLs when the server allows them (size and time bounded).

Every failure is an MultimodalInputError naming the request part that carried the payload,
so the HTTP layer answers 400 for it and nothing else is affected.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageSequence, UnidentifiedImageError

from radixserve.multimodal.errors import MultimodalInputError


@dataclass(frozen=True)
class LoadLimits:
    """What a payload may cost: bytes per payload, decoded pixels per image (or frame),
    whether http(s) URLs are fetched, and how long a fetch may take."""

    max_bytes: int = 64 << 20
    max_pixels: int = 32 * 1024 * 1024
    allow_http: bool = False
    timeout_s: float = 10.0
    max_frames: int = 768


@dataclass
class LoadedImage:
    image: Image.Image  # RGB
    raw: bytes  # what the content hash is taken of


@dataclass
class LoadedVideo:
    frames: list[Image.Image]  # RGB, all the same size
    raw: bytes
    fps: float | None  # frame rate of the source, where it says (animated images do)


def read_payload(source: Any, param: str, limits: LoadLimits) -> bytes | Image.Image:
    """The bytes of one payload (or a PIL image given directly, offline)."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, str):
        data = _read_str(source.strip(), param, limits)
    elif isinstance(source, dict) and "url" in source:
        return read_payload(source["url"], param, limits)
    else:
        raise MultimodalInputError(f"{param}: expected a URL, a path, base64 text or bytes, "
                                  f"got {type(source).__name__}", param)
    if len(data) > limits.max_bytes:
        raise MultimodalInputError(f"{param}: the payload is {len(data)} bytes; the limit is "
                                  f"{limits.max_bytes}", param)
    if not data:
        raise MultimodalInputError(f"{param}: the payload is empty", param)
    return data


def _read_str(s: str, param: str, limits: LoadLimits) -> bytes:
    if s.startswith("data:"):
        head, sep, body = s.partition(",")
        if not sep or ";base64" not in head:
            raise MultimodalInputError(f"{param}: a data: URL must be base64 "
                                      f"(data:<type>;base64,<data>)", param)
        return _b64(body, param, limits)
    if s.startswith(("http://", "https://")):
        return _fetch(s, param, limits)
    if s.startswith("file://"):
        s = s[len("file://"):]
    if os.path.isabs(s) or os.path.exists(s):
        try:
            size = os.path.getsize(s)
            if size > limits.max_bytes:
                raise MultimodalInputError(f"{param}: the file is {size} bytes; the limit is "
                                          f"{limits.max_bytes}", param)
            with open(s, "rb") as f:
                return f.read()
        except OSError as exc:
            raise MultimodalInputError(f"{param}: cannot read {s!r}: {exc.strerror}",
                                      param) from None
    return _b64(s, param, limits)  # SGLang also takes bare base64 text


def _b64(body: str, param: str, limits: LoadLimits) -> bytes:
    if len(body) * 3 // 4 > limits.max_bytes:
        raise MultimodalInputError(f"{param}: the payload is over {limits.max_bytes} bytes",
                                  param)
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise MultimodalInputError(f"{param}: not a URL, a readable path, or valid base64",
                                  param) from None


def _fetch(url: str, param: str, limits: LoadLimits) -> bytes:
    if not limits.allow_http:
        raise MultimodalInputError(f"{param}: http(s) URLs are not fetched by this server "
                                  f"(start it with --mm-allow-http-urls, or send the data "
                                  f"inline as a data: URL)", param)
    try:
        with urllib.request.urlopen(url, timeout=limits.timeout_s) as resp:
            data = resp.read(limits.max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise MultimodalInputError(f"{param}: fetching the URL failed: {reason}",
                                  param) from None
    if len(data) > limits.max_bytes:
        raise MultimodalInputError(f"{param}: the download is over {limits.max_bytes} bytes",
                                  param)
    return data


def _open(data: bytes, param: str, limits: LoadLimits) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise MultimodalInputError(f"{param}: the payload is not a decodable image",
                                  param) from None
    _check_pixels(img, param, limits)
    return img


def _check_pixels(img: Image.Image, param: str, limits: LoadLimits) -> None:
    w, h = img.size
    if w < 1 or h < 1:
        raise MultimodalInputError(f"{param}: the image is empty ({w}x{h})", param)
    if w * h > limits.max_pixels:
        raise MultimodalInputError(f"{param}: the image is {w}x{h} = {w * h} pixels; the limit "
                                  f"is {limits.max_pixels} (--mm-max-image-pixels)", param)


def _rgb(img: Image.Image, param: str) -> Image.Image:
    try:
        return img.convert("RGB")
    except (OSError, ValueError, SyntaxError):
        raise MultimodalInputError(f"{param}: the image data is truncated or corrupt",
                                  param) from None


def load_image(source: Any, param: str, limits: LoadLimits) -> LoadedImage:
    payload = read_payload(source, param, limits)
    if isinstance(payload, Image.Image):
        _check_pixels(payload, param, limits)
        img = _rgb(payload, param)
        return LoadedImage(img, img.tobytes() + repr(img.size).encode())
    return LoadedImage(_rgb(_open(payload, param, limits), param), payload)


def load_video(source: Any, param: str, limits: LoadLimits) -> LoadedVideo:
    """A video as frames: a list of images (each any image source), or one animated
    image (GIF, animated WebP or PNG) whose frames and timing PIL decodes. Container
    formats (mp4, webm) need a video decoder, which this installation does not have."""
    if isinstance(source, (list, tuple)):
        if not source:
            raise MultimodalInputError(f"{param}: a video needs at least one frame", param)
        if len(source) > limits.max_frames:
            raise MultimodalInputError(f"{param}: {len(source)} frames; the limit is "
                                      f"{limits.max_frames}", param)
        frames = [load_image(s, f"{param}[{i}]", limits) for i, s in enumerate(source)]
        return _same_size(LoadedVideo([f.image for f in frames],
                                      b"".join(f.raw for f in frames), None), param)
    payload = read_payload(source, param, limits)
    if isinstance(payload, Image.Image):
        return LoadedVideo([load_image(payload, param, limits).image], payload.tobytes(), None)
    img = _open(payload, param, limits)
    n = getattr(img, "n_frames", 1)
    if n > limits.max_frames * 64:
        raise MultimodalInputError(f"{param}: {n} frames is too many to decode", param)
    frames: list[Image.Image] = []
    durations: list[float] = []
    try:
        for frame in ImageSequence.Iterator(img):
            frames.append(frame.convert("RGB"))
            durations.append(float(frame.info.get("duration") or 0))
    except (OSError, ValueError, SyntaxError, EOFError):
        raise MultimodalInputError(f"{param}: the video data is truncated or corrupt",
                                  param) from None
    mean_ms = sum(durations) / len(durations) if durations else 0
    fps = 1000.0 / mean_ms if mean_ms > 0 else None
    return _same_size(LoadedVideo(frames, payload, fps), param)


def _same_size(video: LoadedVideo, param: str) -> LoadedVideo:
    sizes = {f.size for f in video.frames}
    if len(sizes) > 1:
        raise MultimodalInputError(f"{param}: the frames differ in size ({sorted(sizes)[:3]})",
                                  param)
    return video
