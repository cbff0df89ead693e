"""Direct paths to buddies: disco probes, hole punching, relay fallback (see peer.py)."""
