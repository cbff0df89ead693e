"""QUIC on the punched path: links to buddies authenticated by their identity keys."""
