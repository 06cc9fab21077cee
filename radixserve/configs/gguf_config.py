"""GGUF files (llama.cpp): the HF config equivalent to their metadata.

Reading a model's configuration sits below the model loader (configs/ is a low layer),
so the metadata reader lives here; model_loader/gguf_loader.py dequantizes the tensors
and shares the parsed file through `open_gguf`.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from gguf import GGUFReader, GGUFValueType
from transformers import AutoConfig, PretrainedConfig
from transformers import __version__ as transformers_version

from radixserve.envs import envs

logger = logging.getLogger(__name__)

# GGUF `general.architecture` -> (HF model_type, HF architecture name).
_ARCHS = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}


def resolve_gguf_file(model_path: str) -> str:
    """A .gguf path as given, or the single .gguf file inside a folder."""
    if os.path.isfile(model_path):
        return model_path
    if os.path.isdir(model_path):
        found = sorted(n for n in os.listdir(model_path) if n.endswith(".gguf"))
        if len(found) == 1:
            return os.path.join(model_path, found[0])
        raise ValueError(f"{model_path}: expected exactly one .gguf file, found {found}")
    raise ValueError(f"GGUF model {model_path} does not exist")


def open_gguf(path: str) -> GGUFReader:
    """The parsed file, shared by the config and weight readers.

    Parsing the metadata (tens of thousands of vocabulary strings) takes seconds, so the
    last readers are kept, keyed by the file's identity so an edited file is re-read.
    """
    st = os.stat(path)
    return _open_gguf(os.path.realpath(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=2)
def _open_gguf(path: str, mtime_ns: int, size: int) -> GGUFReader:
    try:
        return GGUFReader(path)
    except Exception as e:  # the reader raises assorted errors on a bad or short file
        raise ValueError(f"cannot read GGUF file {path}: {type(e).__name__}: {e}") from e


def gguf_field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    if field.types and field.types[0] == GGUFValueType.ARRAY:
        return list(value)
    return value


def derived_cache_dir(path: str, kind: str) -> Path | None:
    """Where what is derived from a GGUF file (its HF config, its converted tokenizer) is
    kept between starts: parsing the metadata and converting the vocabulary cost seconds
    of CPU in every process that needs them. Keyed by the file's identity and the
    transformers version that did the conversion; under RADIXSERVE_CACHE_DIR (envs.py),
    None when that is `off`."""
    root = envs.RADIXSERVE_CACHE_DIR.get()
    if root == "off":
        return None
    st = os.stat(path)
    ident = f"{os.path.realpath(path)}|{st.st_mtime_ns}|{st.st_size}|{transformers_version}"
    digest = hashlib.sha256(ident.encode()).hexdigest()[:24]
    return Path(os.path.expanduser(root)) / "gguf" / digest / kind


def cached_derivation(path: str, kind: str, load: Callable[[Path], Any],
                      make: Callable[[], Any], save: Callable[[Any, Path], None]) -> Any:
    """`load(dir)` of the cached copy when there is one, else `make()`, saved with
    `save(obj, dir)` into a fresh directory renamed into place (so a reader never sees
    half of it, and two processes converting at once both succeed). A cache that cannot
    be written only costs the next start the conversion again."""
    target = derived_cache_dir(path, kind)
    if target is not None and target.is_dir():
        try:
            return load(target)
        except Exception as e:  # a damaged copy: convert again and replace it
            logger.warning("cached %s of %s unreadable (%s); converting again", kind, path, e)
            shutil.rmtree(target, ignore_errors=True)
    obj = make()
    if target is None:
        return obj
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{kind}-"))
        save(obj, tmp)
        os.rename(tmp, target)
    # Anything going wrong here (a read-only cache, another process renaming its copy
    # first, a save that raises) must not fail the start: the object is already made.
    except Exception as e:
        logger.debug("%s of %s not cached: %s", kind, path, e)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return obj


def load_gguf_config(path: str) -> PretrainedConfig:
    """An HF config equivalent to the GGUF's `<arch>.*` metadata (cached, see
    derived_cache_dir)."""
    return cached_derivation(
        path, "config", load=_read_cached_config, make=lambda: _config_from_metadata(path),
        save=lambda cfg, d: cfg.save_pretrained(str(d)))


def _read_cached_config(folder: Path) -> PretrainedConfig:
    config = AutoConfig.from_pretrained(str(folder))
    config.name_or_path = ""  # as converted: the cache folder is no name for the model
    return config


def _config_from_metadata(path: str) -> PretrainedConfig:
    reader = open_gguf(path)
    arch = gguf_field(reader, "general.architecture")
    if arch not in _ARCHS:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; supported: "
                         f"{', '.join(sorted(_ARCHS))}")
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        # llama.cpp stores Llama 3.1 rope scaling as a tensor of per-frequency factors.
        raise ValueError(f"{path}: GGUF rope_freqs (llama3 rope scaling) is not supported; "
                         f"use the HF safetensors checkpoint")
    model_type, architecture = _ARCHS[arch]
    heads = int(gguf_field(reader, f"{arch}.attention.head_count"))
    hidden = int(gguf_field(reader, f"{arch}.embedding_length"))
    vocab = gguf_field(reader, f"{arch}.vocab_size")
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    kwargs = dict(
        architectures=[architecture],
        num_hidden_layers=int(gguf_field(reader, f"{arch}.block_count")),
        hidden_size=hidden,
        intermediate_size=int(gguf_field(reader, f"{arch}.feed_forward_length")),
        num_attention_heads=heads,
        num_key_value_heads=int(gguf_field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(gguf_field(reader, f"{arch}.attention.key_length", hidden // heads)),
        max_position_embeddings=int(gguf_field(reader, f"{arch}.context_length", 2048)),
        rms_norm_eps=float(gguf_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_parameters={"rope_type": "default", "rope_theta": float(
            gguf_field(reader, f"{arch}.rope.freq_base", 10000.0))},
        vocab_size=int(vocab),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=gguf_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=gguf_field(reader, "tokenizer.ggml.padding_token_id"),
    )
    return AutoConfig.for_model(model_type, **kwargs)
