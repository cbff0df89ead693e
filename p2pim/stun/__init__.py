"""STUN (RFC 8489 / 5780 / 3489): codec on aioice's table and sans-IO client transactions."""
