"""Token-bucket rate limits with bounded memory (abuse limits on GetNonce and Enroll).

Each key (a peer address, a device) has a bucket of ``burst`` calls refilled at
``rate_per_s``. At most ``max_keys`` buckets are kept: the least recently used go
first, which only ever forgets a key's past (it starts again with a full bucket),
so an attacker rotating addresses cannot grow memory. Limits are per process: with
N workers a caller spread over all of them gets up to N times the rate.
"""

from __future__ import annotations

from collections import OrderedDict
from urllib.parse import unquote


class RateLimiter:
    def __init__(self, rate_per_s: float, burst: int, max_keys: int = 100_000) -> None:
        if rate_per_s <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate_per_s, burst and max_keys must be positive")
        self.rate = rate_per_s
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def take(self, key: str, now_s: float) -> float:
        """Spend one call for ``key``: 0.0 if allowed, else the seconds until one is."""
        tokens, at = self._buckets.pop(key, (self.burst, now_s))
        tokens = min(self.burst, tokens + max(0.0, now_s - at) * self.rate)
        if tokens >= 1.0:
            wait = 0.0
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens, now_s)
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait

    def __len__(self) -> int:
        return len(self._buckets)


def peer_host(peer: str) -> str:
    """The address part of a gRPC peer string ("ipv4:1.2.3.4:555" -> "1.2.3.4")."""
    kind, _, rest = peer.partition(":")
    rest = unquote(rest)  # grpc writes IPv6 brackets percent-encoded ("%5B::1%5D:555")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1 : rest.find("]")] if "]" in rest else rest
    if kind in ("ipv4", "ipv6"):
        return rest.rsplit(":", 1)[0]
    return peer  # unix sockets and the like: the whole string
