"""Replay protection for run envelopes, shared by every runner instance (DESIGN §7 step 4).

Implements :class:`hivemind.envelope.ReplayGuard` with one conditional put per nonce: the first runner
to record a nonce wins, any later attempt (another instance, a replayed message) is refused. Items carry
a TTL a day past the envelope's expiry; DynamoDB deletes them lazily, which only ever refuses more.
"""

from __future__ import annotations

import re

from hivemind.errors import ExpiredError, InvalidInput, ReplayError
from hivemind.store.base import Clock, ConditionFailed, Table
from hivemind.store.config import AwsClients
from hivemind.store.schema import TableRole

_NONCE = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
# Kept well past expiry so clock skew between instances can never make a live envelope replayable.
_RETENTION_AFTER_EXPIRY_S = 86_400


class NonceRepository:
    def __init__(self, clients: AwsClients, clock: Clock) -> None:
        self._table = Table(clients, TableRole.NONCES)
        self._clock = clock

    def check_and_record(self, nonce: str, expires_at: int) -> None:
        """Spend ``nonce``: :class:`ExpiredError` if its envelope has expired, :class:`ReplayError` if it
        was spent before."""
        if not isinstance(nonce, str) or not _NONCE.fullmatch(nonce):
            raise InvalidInput("a nonce is 16 to 128 base64url characters")
        now = self._clock()
        if expires_at <= now:
            raise ExpiredError(f"envelope expired at {expires_at}, now is {now}")
        try:
            self._table.put(
                {
                    "nonce": nonce,
                    "expires_at": expires_at,
                    "recorded_at": now,
                    "purge_at": expires_at + _RETENTION_AFTER_EXPIRY_S,
                },
                condition="attribute_not_exists(nonce)",
            )
        except ConditionFailed:
            raise ReplayError("this run envelope was already opened (nonce seen before)") from None
