"""NAT behaviour discovery (RFC 5780 / RFC 3489) and the `p2pim nat` report."""
