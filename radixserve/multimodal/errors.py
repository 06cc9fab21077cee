"""The error of a bad multimodal payload (this layer sits below managers/, whose
InvalidRequestError the request path turns it into: a 400 naming `param`)."""

from __future__ import annotations


class MultimodalInputError(ValueError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
