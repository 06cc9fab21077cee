"""Model and tokenizer loading.

`get_tokenizer` is resolved on first use: its module imports transformers'
AutoTokenizer, which pulls in most of transformers, and the scheduler process (which
loads the model but seldom needs a tokenizer) should not pay for that at start-up.
"""

from typing import Any

from radixserve.model_loader.loader import load_model

__all__ = ["get_tokenizer", "load_model"]


def __getattr__(name: str) -> Any:
    if name == "get_tokenizer":
        from radixserve.model_loader.tokenizer import get_tokenizer

        return get_tokenizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
