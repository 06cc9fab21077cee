from radixserve.model_loader.loader import load_model
from radixserve.model_loader.tokenizer import get_tokenizer

__all__ = ["get_tokenizer", "load_model"]
