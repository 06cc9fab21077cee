"""How a stored page is framed: a header (magic, payload length, CRC-32 of the payload,
a digest of the KV layout) and the page's bytes. Decoding checks all four, so a
truncated or corrupted page, or one written under another layout, is refused."""

from __future__ import annotations

import struct
import zlib

import torch

_MAGIC = b"RSKVPG01"
_HEADER = struct.Struct("<8sQI16s")  # magic, payload bytes, crc32, layout digest


def encode_page(payload: bytes, layout_digest: bytes) -> bytes:
    return _HEADER.pack(_MAGIC, len(payload), zlib.crc32(payload), layout_digest) + payload


def decode_page(raw: bytes, layout_digest: bytes, nbytes: int) -> bytes | None:
    """The payload, or None if raw is not an intact page of nbytes for this layout."""
    if len(raw) < _HEADER.size:
        return None
    magic, n, crc, digest = _HEADER.unpack_from(raw)
    payload = raw[_HEADER.size:]
    if (magic != _MAGIC or n != len(payload) or n != nbytes or digest != layout_digest
            or zlib.crc32(payload) != crc):
        return None
    return payload


def page_tensor(payload: bytes, target: torch.Tensor | None) -> torch.Tensor:
    """A decoded page as uint8, copied into `target` when the caller gave one."""
    data = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    if target is None:
        return data
    target.copy_(data)
    return target
