"""Fixed-window rate limits per caller, for the admission chain's last step (DESIGN §10).

One atomic conditional counter per (key, window): the increment succeeds only while the count is below
the limit, so concurrent requests can never exceed it. Counters expire by TTL.
"""

from __future__ import annotations

from hivemind.errors import InvalidInput, RateLimited
from hivemind.store.base import Clock, ConditionFailed, Table
from hivemind.store.config import AwsClients
from hivemind.store.schema import TableRole


class RateLimitRepository:
    def __init__(self, clients: AwsClients, clock: Clock) -> None:
        self._table = Table(clients, TableRole.RATE_LIMITS)
        self._clock = clock

    def hit(self, key: str, *, limit: int, window_s: int) -> int:
        """Count one request for ``key`` in the current window; return how many remain.

        Raises :class:`RateLimited` (with ``retry_after`` seconds in its details) once ``limit`` requests
        were counted in this window.
        """
        if limit < 1 or window_s < 1:
            raise InvalidInput("a rate limit allows at least one request per window of at least a second")
        if not key or "#" in key or len(key) > 200:
            raise InvalidInput("a rate-limit key is 1 to 200 characters without '#'")
        now = self._clock()
        window_start = now - now % window_s
        try:
            item = self._table.update(
                {"window_key": f"{key}#{window_s}#{window_start}"},
                update="ADD hits :one SET purge_at = :purge",
                condition="attribute_not_exists(hits) OR hits < :limit",
                values={":one": 1, ":limit": limit, ":purge": window_start + 2 * window_s},
            )
        except ConditionFailed:
            retry_after = window_start + window_s - now
            raise RateLimited(
                f"more than {limit} requests in {window_s} s; retry in {retry_after} s",
                details={"retry_after": retry_after},
            ) from None
        return limit - int(item["hits"])
