"""Sizes and intervals both ends of the control protocol agree on (defined once, here)."""

from __future__ import annotations

MAX_FRAME = 256 * 1024  # bytes in one control frame; bigger ones are a protocol error
MAX_ENVELOPE = 64 * 1024  # bytes in one sealed envelope, on every road
ID_SIZE = 16  # bytes in a message id (see p2pim.messaging.ids)
DEFAULT_HEARTBEAT_S = 20  # the server's ping interval unless its operator says otherwise (LoginOk says)
