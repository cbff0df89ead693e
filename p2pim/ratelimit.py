"""Per-key token buckets with a bounded table.

Used by the rendezvous (STUN per source IP, logins, relaying, ...) and by the
LAN node (IP Messenger messages per source address). Time is passed in, so
tests drive it with a fake clock.

The table is bounded: an attacker spraying source addresses must not grow our
memory without limit. When full, the least recently seen key is forgotten,
which at worst gives that key a fresh bucket: a bounded leak of tokens,
never unbounded memory.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

DEFAULT_MAX_KEYS = 65536


class RateLimiter:
    """Allow ``rate`` events per second per key, with bursts up to ``burst``."""

    def __init__(self, rate: float, burst: float, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        # key -> (tokens, time of last refill); most recently used last.
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()

    def allow(self, key: Hashable, now: float) -> bool:
        """Take one token for ``key``; False when its bucket is empty."""
        tokens = self._refill(key, now)
        allowed = tokens >= 1.0
        self._keep(key, tokens - 1.0 if allowed else tokens, now)
        return allowed

    def charge(self, key: Hashable, now: float, cost: float) -> float:
        """Take ``cost`` tokens even if ``key`` has fewer (its bucket goes into debt); returns
        how long until the debt is paid off (0 if there was none). For shaping, not refusing:
        the caller lets the event through and then waits that long before the next."""
        tokens = self._refill(key, now) - cost
        self._keep(key, tokens, now)
        return -tokens / self.rate if tokens < 0 else 0.0

    def _refill(self, key: Hashable, now: float) -> float:
        """``key``'s tokens now (taken out of the table: :meth:`_keep` puts them back, last)."""
        tokens, last = self._buckets.pop(key, (self.burst, now))
        return min(self.burst, tokens + (now - last) * self.rate)

    def _keep(self, key: Hashable, tokens: float, now: float) -> None:
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)
