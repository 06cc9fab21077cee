from radixserve.configs.model_config import ModelConfig

__all__ = ["ModelConfig"]
