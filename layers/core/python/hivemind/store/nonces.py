"""Replay protection for run envelopes, shared by every runner instance (DESIGN §7 step 4).

Implements :class:`hivemind.envelope.ReplayGuard` with one conditional write per nonce: the first runner
to record a nonce wins, any later attempt (another instance, a replayed message) is refused. Items carry
a TTL a day past the envelope's expiry; DynamoDB deletes them lazily, which only ever refuses more.

A nonce may be recorded together with the run id that spent it (:meth:`NonceRepository.guard_for_run`).
Opening the same envelope again *for that run* is then a resume, not a replay: SQS redelivers a run whose
runner died, and the next runner must be able to open its envelope. The same nonce under any other run id
is a replay.
"""

from __future__ import annotations

import re

from hivemind.errors import ExpiredError, InvalidInput, ReplayError
from hivemind.store.base import Clock, ConditionFailed, Table
from hivemind.store.config import AwsClients
from hivemind.store.schema import TableRole

_NONCE = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
_RUN_ID = re.compile(r"^[a-z][a-z0-9]*_[a-z0-9]{1,64}$")
# Kept well past expiry so clock skew between instances can never make a live envelope replayable.
_RETENTION_AFTER_EXPIRY_S = 86_400


class RunNonceGuard:
    """A :class:`hivemind.envelope.ReplayGuard` that spends nonces on behalf of one run."""

    def __init__(self, repository: NonceRepository, run_id: str) -> None:
        self._repository = repository
        self.run_id = run_id

    def check_and_record(self, nonce: str, expires_at: int) -> None:
        self._repository.check_and_record(nonce, expires_at, run_id=self.run_id)


class NonceRepository:
    def __init__(self, clients: AwsClients, clock: Clock) -> None:
        self._table = Table(clients, TableRole.NONCES)
        self._clock = clock

    def guard_for_run(self, run_id: str) -> RunNonceGuard:
        """The replay guard a runner passes to ``open_run_envelope`` for ``run_id``."""
        if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
            raise InvalidInput("a run id looks like run_<lowercase letters and digits>")
        return RunNonceGuard(self, run_id)

    def check_and_record(self, nonce: str, expires_at: int, *, run_id: str | None = None) -> None:
        """Spend ``nonce``: :class:`ExpiredError` if its envelope has expired, :class:`ReplayError` if it
        was spent before, unless it was spent by the same ``run_id`` (a resumed run)."""
        if not isinstance(nonce, str) or not _NONCE.fullmatch(nonce):
            raise InvalidInput("a nonce is 16 to 128 base64url characters")
        if run_id is not None and (not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id)):
            raise InvalidInput("a run id looks like run_<lowercase letters and digits>")
        now = self._clock()
        if expires_at <= now:
            raise ExpiredError(f"envelope expired at {expires_at}, now is {now}")
        values = {":expires": expires_at, ":now": now, ":purge": expires_at + _RETENTION_AFTER_EXPIRY_S}
        update = (
            "SET expires_at = :expires, recorded_at = if_not_exists(recorded_at, :now), purge_at = :purge"
        )
        condition = "attribute_not_exists(nonce)"
        if run_id is not None:
            # The same run may open its envelope again (takeover after redelivery); no other run may.
            update += ", run_id = :run"
            condition += " OR run_id = :run"
            values[":run"] = run_id
        try:
            self._table.update({"nonce": nonce}, update=update, condition=condition, values=values)
        except ConditionFailed:
            raise ReplayError("this run envelope was already opened (nonce seen before)") from None
