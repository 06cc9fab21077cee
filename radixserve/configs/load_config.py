"""LoadConfig: the part of ServerArgs that reading a model and its tokenizer needs.

Built by `ServerArgs.load_config()`; read by ModelConfig, get_tokenizer and load_model,
which therefore do not depend on the server's flags (radixserve.server_args sits above
them in the package's layers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoadConfig:
    model_path: str
    tokenizer_path: str | None = None
    load_format: str = "auto"  # auto | safetensors | gguf | dummy
    is_gguf: bool = False  # load_format gguf, or auto and a .gguf model path
    torch_dtype: torch.dtype = torch.float32  # the serving dtype, "auto" resolved
    quantization: str | None = None  # --quantization (the checkpoint's config decides too)
    context_length: int | None = None  # None: the model's own
    trust_remote_code: bool = False
    chat_template: str | None = None  # a file path or a Jinja string
    device: str = "cpu"
    random_seed: int = 0  # seeds dummy weights
    # --is-embedding: a decoder (LlamaForCausalLM, Qwen3ForCausalLM, ...) is served as an
    # embedder (configs/pooling_config.py).
    is_embedding: bool = False
