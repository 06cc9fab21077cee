"""Hugging Face Hub ids (`org/name`) as model and tokenizer paths.

An id is looked up in the local HF cache first (`--download-dir`, else HF_HUB_CACHE /
HF_HOME, huggingface_hub's own rules), so a model fetched once is served without the
network; it is downloaded only when the cache lacks it and HF_HUB_OFFLINE is not set.
Either way the result is the snapshot folder, which the loaders read as any local
model folder. A path that exists on disk is never treated as an id.
"""

from __future__ import annotations

import os
import re

# Files a served model needs: config, tokenizer, chat template, safetensors weights.
# Other weight formats (.bin, .pt, .h5, .msgpack) are never read, so never fetched.
_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
_TOKENIZER_PATTERNS = ["*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
# org/name, as the Hub spells repository ids (no leading dot or slash, one slash).
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]{0,95}/[\w.\-]{1,96}$")


class ModelNotFoundError(ValueError):
    """A hub id found neither in the local cache nor online."""


def is_hub_id(path: str) -> bool:
    """`org/name` that names no file or folder on disk. A single name (`gpt2`) is not
    taken for an id, as it is more often a mistyped local path."""
    return (not os.path.exists(path) and bool(_REPO_ID.match(path))
            and not path.endswith(".gguf") and ".." not in path)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE, as huggingface_hub read it at import (radixserve reads no
    environment variable itself but in envs.py)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def resolve_model_path(path: str, *, revision: str | None = None,
                       download_dir: str | None = None, weights: bool = True) -> str:
    """The local folder of `path`: itself unless it is a hub id, else that id's snapshot
    at `revision` (a branch, tag or commit; default main). `weights=False` (a
    tokenizer, dummy weights) accepts and fetches a snapshot without weight files.
    Raises ModelNotFoundError naming the id."""
    if not is_hub_id(path):
        return path
    cached = _cached_snapshot(path, revision, download_dir, weights)
    if cached is not None:
        return cached
    if hub_offline():
        where = download_dir or _default_cache()
        raise ModelNotFoundError(
            f"model {path!r}{_at(revision)} is not in the local Hugging Face cache "
            f"({where}) and HF_HUB_OFFLINE is set: download it first or unset HF_HUB_OFFLINE")
    return _download(path, revision, download_dir, weights)


def _cached_snapshot(repo_id: str, revision: str | None, cache_dir: str | None,
                     weights: bool) -> str | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                   local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError):
        return None
    if not weights:
        return folder
    # A snapshot holding only what an earlier config lookup fetched is not a model.
    names = os.listdir(folder)
    if "config.json" not in names or not any(n.endswith(".safetensors") for n in names):
        return None
    return folder


def _download(repo_id: str, revision: str | None, cache_dir: str | None,
              weights: bool) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    try:
        # snapshot_download shows one tqdm bar per file and one for the whole snapshot.
        return snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir,
            allow_patterns=_ALLOW_PATTERNS if weights else _TOKENIZER_PATTERNS)
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"model {repo_id!r} has no revision {revision!r} on the "
                                 f"Hugging Face Hub") from None
    except GatedRepoError:
        raise ModelNotFoundError(f"model {repo_id!r} is gated on the Hugging Face Hub: "
                                 f"log in (HF_TOKEN) with access to it") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"model {repo_id!r} is neither a local path nor a model on "
                                 f"the Hugging Face Hub") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        # No network (LocalEntryNotFoundError), or the Hub answered with an error.
        raise ModelNotFoundError(
            f"model {repo_id!r}{_at(revision)} is not in the local Hugging Face cache "
            f"and could not be downloaded: {exc}") from None


def _at(revision: str | None) -> str:
    return f" at revision {revision!r}" if revision else ""


def _default_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE
