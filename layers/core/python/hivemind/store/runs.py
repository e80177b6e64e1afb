"""Runs: the run state machine as conditional writes (DESIGN §7).

``pending -> running -> completed | failed | expired``; ``failed`` and ``expired`` may also follow
``pending`` (a run that never started). ``running -> running`` is a takeover: SQS redelivered the run
after its runner vanished, and the attempt count goes up. Every transition is one conditional update,
so an illegal one is refused by the store itself, and a redelivered completion finds the run already in
that state and changes nothing (``applied=False``): a run is never finished twice.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from hivemind.envelope import OutputRecipient, SealedEnvelope
from hivemind.errors import Conflict, InvalidInput, NotFound
from hivemind.models import Budgets, RunStatus, Sha256Hex, Stage, StageUsage, StrictModel, UnixSeconds
from hivemind.store.base import Clock, ConditionFailed, Page, Record, Table
from hivemind.store.config import AwsClients
from hivemind.store.schema import RUNS_BY_CALLER, RUNS_BY_ROOM, RUNS_OPEN, TableRole

_SOURCES: dict[RunStatus, tuple[RunStatus, ...]] = {
    RunStatus.RUNNING: (RunStatus.PENDING, RunStatus.RUNNING),
    RunStatus.COMPLETED: (RunStatus.RUNNING,),
    RunStatus.FAILED: (RunStatus.PENDING, RunStatus.RUNNING),
    RunStatus.EXPIRED: (RunStatus.PENDING, RunStatus.RUNNING),
}


class RunRecord(Record):
    run_id: str = Field(min_length=1, max_length=80)
    room_id: str = Field(min_length=1, max_length=80)
    # Bearer id of the credential that asked (invite callers see only their own runs).
    caller_id: str = Field(min_length=1, max_length=80)
    payer_tenant_id: str = Field(min_length=1, max_length=80)
    status: RunStatus = RunStatus.PENDING
    budgets: Budgets
    hold: int = Field(ge=0, description="micro-USD held for this run")
    prompt_sha256: Sha256Hex
    manifest_hash: Sha256Hex
    envelope_key: str
    runner_id: str | None = None
    attempts: int = Field(default=0, ge=0)
    stage: Stage | None = None
    created_at: UnixSeconds
    updated_at: UnixSeconds
    started_at: UnixSeconds | None = None
    finished_at: UnixSeconds | None = None
    usage: list[StageUsage] = Field(default_factory=list)
    receipt_key: str | None = None
    output_key: str | None = None
    # The output's HMS1 key, HPKE-sealed per recipient ("querier", and "owner" when the room shows it).
    sealed_output_keys: dict[OutputRecipient, SealedEnvelope] = Field(default_factory=dict)
    artifact_names: list[str] = Field(default_factory=list)
    error_code: str | None = Field(default=None, max_length=80)
    error_message: str | None = Field(default=None, max_length=1000)


class RunResult(StrictModel):
    """What a finished run records; receipts and outputs are stored in the bucket under these keys."""

    usage: list[StageUsage] = Field(default_factory=list)
    receipt_key: str | None = None
    output_key: str | None = None
    # The output's HMS1 key, HPKE-sealed per recipient ("querier", and "owner" when the room shows it).
    sealed_output_keys: dict[OutputRecipient, SealedEnvelope] = Field(default_factory=dict)
    artifact_names: list[str] = Field(default_factory=list)
    error_code: str | None = Field(default=None, max_length=80)
    error_message: str | None = Field(default=None, max_length=1000)


class RunTransition(StrictModel):
    run: RunRecord
    # False when the run was already in the target state (a redelivered message): nothing changed.
    applied: bool


class RunRepository:
    def __init__(self, clients: AwsClients, clock: Clock) -> None:
        self._table = Table(clients, TableRole.RUNS)
        self._clock = clock

    def create(self, record: RunRecord) -> RunRecord:
        if record.status is not RunStatus.PENDING:
            raise InvalidInput("a new run is pending")
        self._table.put_new(
            {**record.to_item(), "open_status": RunStatus.PENDING.value}, what=f"run {record.run_id}"
        )
        return record

    def get(self, run_id: str) -> RunRecord | None:
        item = self._table.get({"run_id": run_id})
        return RunRecord.from_item(item) if item else None

    def require(self, run_id: str) -> RunRecord:
        record = self.get(run_id)
        if record is None:
            raise NotFound(f"no run {run_id}")
        return record

    def start(self, run_id: str, runner_id: str) -> RunRecord:
        """A runner takes the run (first delivery or takeover after redelivery). A finished run is
        :class:`Conflict` with code ``run_finished``: the runner drops the message."""
        now = self._clock()
        try:
            item = self._table.update(
                {"run_id": run_id},
                update=(
                    "SET #status = :running, open_status = :running, runner_id = :runner,"
                    " attempts = attempts + :one, started_at = if_not_exists(started_at, :now),"
                    " updated_at = :now REMOVE stage"
                ),
                condition="#status IN (:pending, :running)",
                names={"#status": "status"},
                values={
                    ":running": RunStatus.RUNNING.value,
                    ":pending": RunStatus.PENDING.value,
                    ":runner": runner_id,
                    ":one": 1,
                    ":now": now,
                },
            )
        except ConditionFailed:
            current = self.require(run_id)
            raise Conflict(f"run {run_id} is already {current.status.value}", code="run_finished") from None
        return RunRecord.from_item(item)

    def set_stage(self, run_id: str, runner_id: str, stage: Stage) -> RunRecord:
        """Progress report for clients; refused unless this runner still owns the running run."""
        try:
            item = self._table.update(
                {"run_id": run_id},
                update="SET stage = :stage, updated_at = :now",
                condition="#status = :running AND runner_id = :runner",
                names={"#status": "status"},
                values={
                    ":stage": stage.value,
                    ":running": RunStatus.RUNNING.value,
                    ":runner": runner_id,
                    ":now": self._clock(),
                },
            )
        except ConditionFailed:
            self.require(run_id)
            raise Conflict(
                f"run {run_id} is no longer running on {runner_id}", code="run_not_owned"
            ) from None
        return RunRecord.from_item(item)

    def finish(self, run_id: str, status: RunStatus, result: RunResult) -> RunTransition:
        """Move the run to a terminal ``status`` with its result.

        Already in ``status``: nothing changes and ``applied`` is False (the first result stands). Any
        other state the transition may not leave (another terminal state, or ``pending`` for
        ``completed``): :class:`Conflict` with code ``illegal_run_transition``.
        """
        if not status.terminal:
            raise InvalidInput(f"{status.value} is not a terminal run status")
        now = self._clock()
        sources = _SOURCES[status]
        values: dict[str, Any] = {":target": status.value, ":now": now}
        values.update({f":from{index}": source.value for index, source in enumerate(sources)})
        names = {"#status": "status"}
        assignments = ["#status = :target", "updated_at = :now", "finished_at = :now"]
        for name, value in result.model_dump(mode="json").items():
            if value is not None and value != []:
                # Placeholders for every name: some ("usage") are DynamoDB reserved words.
                names[f"#{name}"] = name
                assignments.append(f"#{name} = :{name}")
                values[f":{name}"] = value
        try:
            item = self._table.update(
                {"run_id": run_id},
                update="SET " + ", ".join(assignments) + " REMOVE open_status, stage",
                condition=f"#status IN ({', '.join(f':from{index}' for index in range(len(sources)))})",
                names=names,
                values=values,
            )
        except ConditionFailed:
            current = self.require(run_id)
            if current.status is status:
                return RunTransition(run=current, applied=False)
            raise Conflict(
                f"run {run_id} is {current.status.value}; it cannot become {status.value}",
                code="illegal_run_transition",
            ) from None
        return RunTransition(run=RunRecord.from_item(item), applied=True)

    def list_by_room(self, room_id: str, *, cursor: str | None = None, limit: int = 50) -> Page[RunRecord]:
        """The room's runs, newest first."""
        return self._page(RUNS_BY_ROOM, "room_id", room_id, cursor, limit)

    def list_by_caller(
        self, caller_id: str, *, cursor: str | None = None, limit: int = 50
    ) -> Page[RunRecord]:
        """One caller's runs, newest first."""
        return self._page(RUNS_BY_CALLER, "caller_id", caller_id, cursor, limit)

    def list_open(self, status: RunStatus, *, idle_since: int, limit: int = 100) -> list[RunRecord]:
        """Pending or running runs not updated since ``idle_since`` (for the janitor), oldest first."""
        if status.terminal:
            raise InvalidInput("only pending and running runs are open")
        items, _ = self._table.query(
            index=RUNS_OPEN,
            key_condition="open_status = :status AND updated_at < :since",
            values={":status": status.value, ":since": idle_since},
            scope={"open_status": status.value},
            limit=limit,
        )
        return [RunRecord.from_item(item) for item in items]

    def _page(
        self, index: str, attribute: str, value: str, cursor: str | None, limit: int
    ) -> Page[RunRecord]:
        items, next_cursor = self._table.query_partition(
            index, attribute, value, cursor=cursor, limit=limit, newest_first=True
        )
        return Page[RunRecord](items=[RunRecord.from_item(item) for item in items], cursor=next_cursor)
