"""p2pim: a P2P-first instant messenger (client library and CLI)."""

__version__ = "0.1.0"
