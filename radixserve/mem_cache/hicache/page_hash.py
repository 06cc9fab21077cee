"""Storage keys of KV pages: a hash of the token prefix that ends with the page.

Page i's key hashes tokens [0, (i + 1) * page_size), so equal keys mean equal prefixes
and hence equal KV (for one model and layout, which the storage file names and headers
add). That lets a page be found without its tree: in host memory after the device tree
dropped it, or on disk by a second server or after a restart.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

_TOKEN_BYTES = 8


def new_prefix_state(page_size: int) -> "hashlib._Hash":
    """The hash state of the empty prefix. The page size is part of every key: a page
    of another size holds other tokens under the same prefix."""
    return hashlib.sha256(f"radixserve-kv-page-v1/{page_size}".encode())


def page_hashes(tokens: Sequence[int], page_size: int,
                state: "hashlib._Hash | None" = None, first_page: int = 0) -> list[str]:
    """Keys of the whole pages of `tokens` from `first_page` on, continuing `state` (the
    hash of the prefix before them, updated in place) or starting from the empty
    prefix. The pages before first_page are hashed in one go, without their keys."""
    state = state if state is not None else new_prefix_state(page_size)
    data = array("q", tokens).tobytes()
    step = page_size * _TOKEN_BYTES
    state.update(data[:first_page * step])
    keys = []
    for start in range(first_page * step, len(tokens) // page_size * step, step):
        state.update(data[start:start + step])
        keys.append(state.hexdigest())  # digest() leaves the state usable
    return keys
