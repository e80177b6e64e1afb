"""Runners: attestation documents published by the confidential runners, and their heartbeats (DESIGN §6).

The control plane only relays these documents; clients verify them (quote, report data, event log),
so nothing here is trusted for security. ``list_live`` is the runner set a client chooses from.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import Field

from hivemind.errors import InvalidInput, NotFound
from hivemind.models import TeeKind, UnixSeconds
from hivemind.store.base import Clock, ConditionFailed, Record, Table
from hivemind.store.config import AwsClients
from hivemind.store.schema import RUNNERS_BY_HEARTBEAT, TableRole

# Every runner item carries this constant so one index lists the whole fleet ordered by heartbeat.
_FLEET = "runners"
DEFAULT_MAX_HEARTBEAT_AGE_S = 120


class RunnerStatus(StrEnum):
    ACTIVE = "active"
    DRAINING = "draining"
    STOPPED = "stopped"


class RunnerRecord(Record):
    runner_id: str = Field(min_length=1, max_length=80)
    tee: TeeKind
    compose_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    version: str = Field(min_length=1, max_length=80)
    # The attestation document as the runner published it (quote, event log, keys, ...).
    attestation: dict[str, Any]
    status: RunnerStatus = RunnerStatus.ACTIVE
    started_at: UnixSeconds
    heartbeat_at: UnixSeconds


class RunnerRepository:
    def __init__(self, clients: AwsClients, clock: Clock) -> None:
        self._table = Table(clients, TableRole.RUNNERS)
        self._clock = clock

    def publish(self, record: RunnerRecord) -> RunnerRecord:
        """Publish (or re-publish after a restart) a runner's attestation document."""
        self._table.put({**record.to_item(), "fleet": _FLEET})
        return record

    def heartbeat(self, runner_id: str) -> RunnerRecord:
        return self._update(runner_id, "SET heartbeat_at = :now", {})

    def set_status(self, runner_id: str, status: RunnerStatus) -> RunnerRecord:
        return self._update(
            runner_id,
            "SET #status = :status, heartbeat_at = :now",
            {":status": status.value},
            names={"#status": "status"},
        )

    def get(self, runner_id: str) -> RunnerRecord | None:
        item = self._table.get({"runner_id": runner_id})
        return RunnerRecord.from_item(item) if item else None

    def list_live(self, *, max_age_s: int = DEFAULT_MAX_HEARTBEAT_AGE_S) -> list[RunnerRecord]:
        """Active runners whose last heartbeat is at most ``max_age_s`` old, freshest first."""
        if max_age_s <= 0:
            raise InvalidInput("max_age_s must be positive")
        items = self._table.query_all(
            index=RUNNERS_BY_HEARTBEAT,
            key_condition="fleet = :fleet AND heartbeat_at >= :since",
            values={
                ":fleet": _FLEET,
                ":since": self._clock() - max_age_s,
                ":active": RunnerStatus.ACTIVE.value,
            },
            names={"#status": "status"},
            filter_expression="#status = :active",
            scope={"fleet": _FLEET},
            newest_first=True,
        )
        return [RunnerRecord.from_item(item) for item in items]

    def _update(
        self, runner_id: str, update: str, values: dict[str, Any], *, names: dict[str, str] | None = None
    ) -> RunnerRecord:
        try:
            item = self._table.update(
                {"runner_id": runner_id},
                update=update,
                condition="attribute_exists(runner_id)",
                names=names,
                values={**values, ":now": self._clock()},
            )
        except ConditionFailed:
            raise NotFound(f"no runner {runner_id}; publish its attestation first") from None
        return RunnerRecord.from_item(item)
