"""Runs: submission (admission, hold, envelope, run row, queue message), visibility and long-polling.

Submission is idempotent on the client's ``idempotency_key`` twice over:

- the run id is derived from (caller, room, key), so every write of a submission is keyed by it and
  repeating one is harmless: the hold is one per run (the store returns the same hold again), the
  envelope object is the same key, the run row is created once;
- Powertools idempotency (the ``idempotency`` table) remembers the answer of a finished submission and
  refuses a concurrent duplicate while the first is in flight, so a retried request never sends a
  second queue message or spends a second invite use.

A submission interrupted between its writes (a Lambda timeout) is completed by the client's retry with
the same key; if no retry comes, the janitor releases the orphaned hold.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import Field, ValidationError

from hivemind.admission import raise_for_decision
from hivemind.canonical import canonical_json
from hivemind.encoding import b32encode
from hivemind.envelope import SealedEnvelope
from hivemind.errors import (
    Conflict,
    HivemindError,
    InvalidInput,
    NotFound,
    ServiceUnavailable,
)
from hivemind.manifest import SignedManifest
from hivemind.models import (
    Budgets,
    Identifier,
    OutputVisibility,
    RunStatus,
    Sha256Hex,
    Stage,
    StageUsage,
    StrictModel,
    UnixSeconds,
)
from hivemind.store import Page, Store
from hivemind.store.base import raise_store_error
from hivemind.store.billing import HoldState
from hivemind.store.credentials import CredentialKind, CredentialRecord
from hivemind.store.rooms import RoomRecord, RoomStatus
from hivemind.store.runners import RunnerStatus
from hivemind.store.runs import RunRecord
from hivemind.store.schema import QueueRole, TableRole, run_artifact_key, run_envelope_key
from hivemind.store.tenants import TenantRecord
from hivemind_functions.admission import RunAdmission, admit, build_run_chain
from hivemind_functions.settings import FunctionSettings

IDEMPOTENCY_KEY_PATTERN = r"^[A-Za-z0-9_.:-]{8,128}$"
RUN_ID_PREFIX = "run_"
# How long a finished submission's answer is replayed for a retried request.
SUBMIT_IDEMPOTENCY_TTL_S = 24 * 3600
# The time a submission may take when no Lambda context says otherwise (uvicorn, tests).
LOCAL_REQUEST_BUDGET_S = 30
_RUN_ID_CONTEXT = b"hivemind/v1/run-id|"
# Long-poll re-reads of the run: a finished run is seen within a quarter second (docs/performance.md).
_POLL_FIRST_S = 0.1
_POLL_MAX_S = 0.25


# --- wire models ------------------------------------------------------------------------------------


class SubmitRunRequest(StrictModel):
    """``POST /v1/rooms/{id}/runs``: the sealed envelope and what the control plane may know about it."""

    envelope: SealedEnvelope = Field(description="the run envelope, HPKE-sealed to the runner's attested key")
    runner_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,80}$", description="the runner the client verified")
    prompt_sha256: Sha256Hex = Field(description="SHA-256 of the prompt; the runner checks it")
    budgets: Budgets | None = Field(
        default=None, description="requested budgets; clamped to the room's maxima"
    )
    query_agent_id: Identifier | None = Field(default=None, description="the query agent (uploadable rooms)")
    idempotency_key: str = Field(
        pattern=IDEMPOTENCY_KEY_PATTERN,
        description="chosen by the client per run; a retry with the same key returns the same run",
    )


class SubmittedRun(StrictModel):
    run_id: Identifier
    status: RunStatus
    budgets: Budgets
    hold: int = Field(ge=0, description="micro-USD held until the run is settled")
    payer_tenant_id: str
    created_at: UnixSeconds


class RunView(StrictModel):
    """A run's metadata as a caller may see it. ``prompt_sha256`` is shown to the querier only."""

    run_id: str
    room_id: str
    caller_id: str
    payer_tenant_id: str
    status: RunStatus
    stage: Stage | None
    budgets: Budgets
    hold: int
    manifest_hash: Sha256Hex
    prompt_sha256: Sha256Hex | None
    runner_id: str | None
    attempts: int
    created_at: UnixSeconds
    updated_at: UnixSeconds
    started_at: UnixSeconds | None
    finished_at: UnixSeconds | None
    usage: list[StageUsage]
    artifact_names: list[str]
    error_code: str | None
    error_message: str | None
    output_visible: bool = Field(description="whether this caller may fetch the output (GET .../output)")


class RunList(StrictModel):
    runs: list[RunView]
    cursor: str | None


class ArtifactLink(StrictModel):
    name: str
    url: str
    expires_at: UnixSeconds


class OutputRecipientRole(StrEnum):
    """Whose sealed copy of the output key a caller gets: its own run's, or the room owner's."""

    QUERIER = "querier"
    OWNER = "owner"


class RunOutput(StrictModel):
    """Everything a caller needs to decrypt and verify a finished run's output client-side."""

    run_id: str
    status: RunStatus
    recipient: OutputRecipientRole
    receipt: dict[str, Any] | None = Field(
        description="the signed receipt (verify it against the attested key)"
    )
    output_url: str | None
    sealed_output_key: SealedEnvelope | None
    artifacts: list[ArtifactLink]
    expires_at: UnixSeconds


# --- run ids and idempotency ------------------------------------------------------------------------


def derive_run_id(caller_id: str, room_id: str, idempotency_key: str) -> str:
    """The run id of a submission: a function of who asked, where, and the client's key."""
    digest = hashlib.sha256(_RUN_ID_CONTEXT + f"{caller_id}|{room_id}|{idempotency_key}".encode()).digest()
    return RUN_ID_PREFIX + b32encode(digest[:16])


class LambdaContextLike(Protocol):
    def get_remaining_time_in_millis(self) -> int: ...


@dataclass(frozen=True, slots=True)
class RequestDeadline:
    """Stands in for the Lambda context outside Lambda: Powertools needs the time a request has left to
    know when an interrupted submission's in-progress marker may be taken over."""

    deadline: float

    @classmethod
    def after(cls, seconds: float) -> RequestDeadline:
        return cls(time.monotonic() + seconds)

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self.deadline - time.monotonic()) * 1000))


# --- submission -------------------------------------------------------------------------------------


class RunSubmitter:
    """Admits and records runs for one deployment (the chain and the idempotency store are built once)."""

    def __init__(self, store: Store, settings: FunctionSettings, *, log: Callable[..., None]) -> None:
        self._store = store
        self._settings = settings
        self._log = log
        self._chain = build_run_chain(store, settings)
        self._persistence: Any = None
        self._lock = threading.Lock()

    def submit(
        self,
        *,
        credential: CredentialRecord,
        room_id: str,
        request: SubmitRunRequest,
        payer_override: TenantRecord | None,
        lambda_context: LambdaContextLike | None,
    ) -> SubmittedRun:
        # Imported on first submission: keeps the API handler's cold import small.
        from aws_lambda_powertools.utilities.idempotency import (  # noqa: PLC0415
            IdempotencyConfig,
            idempotent_function,
        )
        from aws_lambda_powertools.utilities.idempotency.exceptions import (  # noqa: PLC0415
            IdempotencyAlreadyInProgressError,
            IdempotencyPersistenceLayerError,
            IdempotencyValidationError,
        )

        caller_id = _bearer_id(credential)
        run_id = derive_run_id(caller_id, room_id, request.idempotency_key)
        fingerprint = hashlib.sha256(
            canonical_json(
                {
                    "request": request.model_dump(mode="json"),
                    "payer": payer_override.tenant_id if payer_override else None,
                }
            )
        ).hexdigest()
        claim = {"key": f"{caller_id}|{room_id}|{request.idempotency_key}", "fingerprint": fingerprint}
        config = IdempotencyConfig(
            event_key_jmespath="key",
            payload_validation_jmespath="fingerprint",
            raise_on_no_idempotency_key=True,
            expires_after_seconds=SUBMIT_IDEMPOTENCY_TTL_S,
            lambda_context=lambda_context or RequestDeadline.after(LOCAL_REQUEST_BUDGET_S),
        )

        @idempotent_function(
            data_keyword_argument="claim",
            persistence_store=self._idempotency_store(),
            config=config,
            key_prefix="hivemind.submit_run",
        )
        def submit_once(claim: dict[str, str]) -> dict[str, Any]:
            return self._submit_once(
                run_id=run_id,
                credential=credential,
                room_id=room_id,
                request=request,
                payer_override=payer_override,
            ).model_dump(mode="json")

        try:
            answer = submit_once(claim=claim)
        except IdempotencyValidationError:
            raise Conflict(
                "this idempotency key was already used for a different run request; use a new key",
                code="idempotency_key_reused",
            ) from None
        except IdempotencyAlreadyInProgressError:
            raise Conflict(
                "a request with this idempotency key is still being processed; retry in a few seconds",
                code="request_in_progress",
            ) from None
        except IdempotencyPersistenceLayerError:
            raise ServiceUnavailable("the idempotency store is unavailable; retry") from None
        return SubmittedRun.model_validate(answer)

    def _idempotency_store(self) -> Any:
        with self._lock:
            if self._persistence is None:
                from aws_lambda_powertools.utilities.idempotency import (  # noqa: PLC0415
                    DynamoDBPersistenceLayer,
                )

                self._persistence = DynamoDBPersistenceLayer(
                    table_name=self._store.config.table_name(TableRole.IDEMPOTENCY),
                    boto3_client=self._store.clients.dynamodb,
                )
            return self._persistence

    def _submit_once(
        self,
        *,
        run_id: str,
        credential: CredentialRecord,
        room_id: str,
        request: SubmitRunRequest,
        payer_override: TenantRecord | None,
    ) -> SubmittedRun:
        store = self._store
        caller_id = _bearer_id(credential)
        existing = store.runs.get(run_id)
        if existing is not None:
            # An earlier attempt of this very submission got as far as the run row.
            if (existing.room_id, existing.caller_id, existing.prompt_sha256) != (
                room_id,
                caller_id,
                request.prompt_sha256,
            ):
                raise Conflict(
                    "this idempotency key was already used for a different run request; use a new key",
                    code="idempotency_key_reused",
                )
            if existing.status is RunStatus.PENDING:
                self._enqueue(run_id)
            return _submitted(existing)

        runner = store.runners.get(request.runner_id)
        if runner is None or runner.status is RunnerStatus.STOPPED:
            raise NotFound(
                f"no runner {request.runner_id}; list live runners with GET /v1/attestation",
                code="runner_unknown",
            )

        envelope_json = request.envelope.to_json().encode()
        result = admit(
            self._chain,
            RunAdmission(
                credential=credential,
                room_id=room_id,
                envelope_bytes=len(envelope_json),
                requested_budgets=request.budgets,
                query_agent_id=request.query_agent_id,
                payer_override=payer_override,
            ),
        )
        self._log(
            "run admission",
            run_id=run_id,
            room_id=room_id,
            allowed=result.allowed,
            deny_code=result.deny_code,
            trail=[entry.model_dump() for entry in result.trail],
        )
        raise_for_decision(result)
        admitted = result.context
        budgets: Budgets = admitted.budgets  # type: ignore[assignment]
        payer_id: str = admitted.payer_tenant_id  # type: ignore[assignment]
        amount: int = admitted.hold  # type: ignore[assignment]
        manifest_hash = admitted.room.manifest_hash  # type: ignore[union-attr]

        is_invite = credential.kind is CredentialKind.INVITE
        # An invite's use is spent once per run: not again when resuming an interrupted submission.
        resumed = is_invite and store.billing.get_hold(run_id) is not None
        hold = store.billing.hold(payer_id, run_id, amount, enforce=self._settings.billing_enforce_credits)
        if hold.state is HoldState.SETTLED:
            raise Conflict(
                "this idempotency key belongs to a request that was refused after its hold; use a new key",
                code="idempotency_key_spent",
            )
        if is_invite and not resumed:
            try:
                store.credentials.consume_use(credential.auth_hash)
            except HivemindError:
                store.billing.release(run_id)
                raise

        envelope_key = run_envelope_key(run_id)
        store.blobs.put_bytes(envelope_key, envelope_json, content_type="application/json")
        now = store.clock()
        record = store.runs.create(
            RunRecord(
                run_id=run_id,
                room_id=room_id,
                caller_id=caller_id,
                payer_tenant_id=payer_id,
                budgets=budgets,
                hold=amount,
                prompt_sha256=request.prompt_sha256,
                manifest_hash=manifest_hash,
                envelope_key=envelope_key,
                created_at=now,
                updated_at=now,
            )
        )
        self._enqueue(run_id)
        self._log("run submitted", run_id=run_id, room_id=room_id, payer=payer_id, hold=amount)
        return _submitted(record)

    def _enqueue(self, run_id: str) -> None:
        clients = self._store.clients
        try:
            clients.sqs.send_message(
                QueueUrl=clients.queue_url(QueueRole.RUNS), MessageBody=json.dumps({"run_id": run_id})
            )
        except (ClientError, BotoCoreError) as exc:
            raise_store_error(exc, "enqueue run")


_SUBMITTERS: weakref.WeakKeyDictionary[Store, dict[FunctionSettings, RunSubmitter]] = (
    weakref.WeakKeyDictionary()
)
_SUBMITTERS_LOCK = threading.Lock()


def submitter_for(store: Store, settings: FunctionSettings, log: Callable[..., None]) -> RunSubmitter:
    """The process's submitter for this store and settings (built on first use)."""
    with _SUBMITTERS_LOCK:
        by_settings = _SUBMITTERS.setdefault(store, {})
        submitter = by_settings.get(settings)
        if submitter is None:
            submitter = by_settings[settings] = RunSubmitter(store, settings, log=log)
        return submitter


def _bearer_id(credential: CredentialRecord) -> str:
    if credential.kind is CredentialKind.TENANT and credential.tenant_id is not None:
        return credential.tenant_id
    return credential.token_id


def _submitted(record: RunRecord) -> SubmittedRun:
    return SubmittedRun(
        run_id=record.run_id,
        status=record.status,
        budgets=record.budgets,
        hold=record.hold,
        payer_tenant_id=record.payer_tenant_id,
        created_at=record.created_at,
    )


# --- visibility -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunAccess:
    """What one caller may see of one run: metadata always (else the run is "not found"), the output
    as ``recipient`` when set."""

    querier: bool
    recipient: OutputRecipientRole | None


def run_access(
    credential: CredentialRecord,
    run: RunRecord,
    room: RoomRecord | None,
    manifest_output: OutputVisibility | None,
) -> RunAccess | None:
    """The visibility rule (DESIGN §12): invite callers see only their runs; owners see their rooms' run
    metadata, and outputs only when the room says ``owner_and_querier``; admins see metadata only.
    ``None``: the caller may not know the run exists."""
    if credential.kind is CredentialKind.ADMIN:
        return RunAccess(querier=False, recipient=None)
    if _bearer_id(credential) == run.caller_id:
        return RunAccess(querier=True, recipient=OutputRecipientRole.QUERIER)
    is_owner = (
        credential.kind is CredentialKind.TENANT
        and room is not None
        and room.tenant_id == credential.tenant_id
    )
    if is_owner:
        shared = manifest_output is OutputVisibility.OWNER_AND_QUERIER
        return RunAccess(querier=False, recipient=OutputRecipientRole.OWNER if shared else None)
    return None


def _output_visibility(room: RoomRecord | None) -> OutputVisibility | None:
    if room is None or room.status is not RoomStatus.ACTIVE or room.envelope is None:
        return None
    try:
        return SignedManifest.model_validate(room.envelope).manifest.output.visibility
    except ValidationError:
        return None


def visible_run(store: Store, credential: CredentialRecord, run_id: str) -> tuple[RunRecord, RunAccess]:
    """The run and the caller's access to it; a run the caller may not see is ``run_not_found``."""
    run = store.runs.get(run_id)
    if run is not None:
        room = store.rooms.get(run.room_id)
        access = run_access(credential, run, room, _output_visibility(room))
        if access is not None:
            return run, access
    raise NotFound(f"no run {run_id}", code="run_not_found")


def run_view(run: RunRecord, access: RunAccess) -> RunView:
    return RunView(
        run_id=run.run_id,
        room_id=run.room_id,
        caller_id=run.caller_id,
        payer_tenant_id=run.payer_tenant_id,
        status=run.status,
        stage=run.stage,
        budgets=run.budgets,
        hold=run.hold,
        manifest_hash=run.manifest_hash,
        # A prompt hash lets whoever can guess the prompt confirm it: only the querier sees it.
        prompt_sha256=run.prompt_sha256 if access.querier else None,
        runner_id=run.runner_id,
        attempts=run.attempts,
        created_at=run.created_at,
        updated_at=run.updated_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
        usage=run.usage,
        artifact_names=run.artifact_names,
        error_code=run.error_code,
        error_message=run.error_message,
        output_visible=access.recipient is not None,
    )


def list_runs(
    store: Store, credential: CredentialRecord, *, room_id: str | None, cursor: str | None, limit: int
) -> RunList:
    """Invites: their own runs. Tenants: their own runs, or with ``room_id`` every run of a room they
    own. Admins: the runs of ``room_id``."""
    page: Page[RunRecord]
    if credential.kind is CredentialKind.INVITE:
        if room_id is not None and room_id != credential.room_id:
            raise NotFound(f"no room {room_id}")
        page = store.runs.list_by_caller(credential.token_id, cursor=cursor, limit=limit)
    elif room_id is None:
        if credential.kind is CredentialKind.ADMIN:
            raise InvalidInput("admins list runs of one room: pass room_id")
        page = store.runs.list_by_caller(_bearer_id(credential), cursor=cursor, limit=limit)
    else:
        room = store.rooms.get(room_id)
        if room is None or (
            credential.kind is CredentialKind.TENANT and room.tenant_id != credential.tenant_id
        ):
            raise NotFound(f"no room {room_id}")
        page = store.runs.list_by_room(room_id, cursor=cursor, limit=limit)
    rooms: dict[str, RoomRecord | None] = {}
    views: list[RunView] = []
    for run in page.items:
        if run.room_id not in rooms:
            rooms[run.room_id] = store.rooms.get(run.room_id)
        room = rooms[run.room_id]
        access = run_access(credential, run, room, _output_visibility(room))
        if access is not None:
            views.append(run_view(run, access))
    return RunList(runs=views, cursor=page.cursor)


# --- long polling -----------------------------------------------------------------------------------


def wait_for_change(
    store: Store,
    run: RunRecord,
    wait_s: float,
    *,
    monotonic: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> RunRecord:
    """Poll the run until its status or stage differs from ``run``'s, or ``wait_s`` passed.

    A terminal run is returned at once. Polls start at 0.2 s apart and back off to 1 s.
    """
    deadline = monotonic() + wait_s
    interval = _POLL_FIRST_S
    current = run
    while not current.status.terminal:
        remaining = deadline - monotonic()
        if remaining <= 0:
            break
        sleep(min(interval, remaining))
        interval = min(interval * 2, _POLL_MAX_S)
        current = store.runs.require(run.run_id)
        if (current.status, current.stage) != (run.status, run.stage):
            break
    return current


# --- outputs ----------------------------------------------------------------------------------------


def run_output(store: Store, run: RunRecord, access: RunAccess, *, expires_in: int) -> RunOutput:
    """Presigned GETs of the output and artifacts plus the output key sealed to the caller's role."""
    if access.recipient is None:
        raise NotFound(
            f"the output of run {run.run_id} is not visible to this caller "
            "(the room shows outputs to its owner only with output visibility owner_and_querier)",
            code="output_not_visible",
        )
    if not run.status.terminal:
        raise Conflict(
            f"run {run.run_id} is {run.status.value}; wait for it to finish", code="run_not_finished"
        )
    receipt: dict[str, Any] | None = None
    if run.receipt_key is not None:
        # Imported here: only output fetches need it, and the API handler's cold import stays small.
        from hivemind.receipt import SignedReceipt  # noqa: PLC0415

        # Parsed so a corrupted object is refused here; the client still verifies the signature.
        receipt = SignedReceipt.from_json(store.blobs.get_bytes(run.receipt_key)).model_dump(mode="json")
    sealed_key = run.sealed_output_keys.get(access.recipient.value)
    output_url: str | None = None
    expires_at = store.clock() + expires_in
    if run.status is RunStatus.COMPLETED and run.output_key is not None and sealed_key is not None:
        download = store.blobs.presign_get(run.output_key, expires_in=expires_in)
        output_url, expires_at = download.url, download.expires_at
    artifacts = []
    if output_url is not None:
        for name in run.artifact_names:
            link = store.blobs.presign_get(run_artifact_key(run.run_id, name), expires_in=expires_in)
            artifacts.append(ArtifactLink(name=name, url=link.url, expires_at=link.expires_at))
    return RunOutput(
        run_id=run.run_id,
        status=run.status,
        recipient=access.recipient,
        receipt=receipt,
        output_url=output_url,
        sealed_output_key=sealed_key if output_url is not None else None,
        artifacts=artifacts,
        expires_at=expires_at,
    )


def artifact_link(
    store: Store, run: RunRecord, access: RunAccess, name: str, *, expires_in: int
) -> ArtifactLink:
    if access.recipient is None:
        raise NotFound(
            f"the output of run {run.run_id} is not visible to this caller", code="output_not_visible"
        )
    if run.status is not RunStatus.COMPLETED or name not in run.artifact_names:
        raise NotFound(f"run {run.run_id} has no artifact {name}", code="artifact_not_found")
    link = store.blobs.presign_get(run_artifact_key(run.run_id, name), expires_in=expires_in)
    return ArtifactLink(name=name, url=link.url, expires_at=link.expires_at)
