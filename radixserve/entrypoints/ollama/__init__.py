"""An Ollama-compatible API (/api/generate, /api/chat, /api/tags, /api/show, /api/version),
so the `ollama` Python client and the tools built on it talk to radixserve."""

from radixserve.entrypoints.ollama.routes import register

__all__ = ["register"]
