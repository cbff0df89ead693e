"""What a request handler raises to refuse a request (the hub answers it with an error frame)."""

from __future__ import annotations


class RequestError(Exception):
    """A refused request: answered with an error frame; the connection stays."""

    def __init__(self, code: int, message: str, retry_after_ms: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms
