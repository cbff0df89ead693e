"""What a request handler raises to refuse a request, and the error frame that answers it."""

from __future__ import annotations

from p2pim.wire import control_pb2 as pb


def error_frame(request_id: int, code: int, message: str, retry_after_ms: int = 0) -> pb.Frame:
    return pb.Frame(
        id=request_id,
        error=pb.Error(code=code, message=message, retry_after_ms=retry_after_ms),  # type: ignore[arg-type]
    )


class RequestError(Exception):
    """A refused request: answered with an error frame; the connection stays."""

    def __init__(self, code: int, message: str, retry_after_ms: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms
