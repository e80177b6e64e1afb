"""One run, from the queue message to the receipt (DESIGN §7 steps 4-6, §16.1).

:meth:`RunLifecycle.execute` takes a run id and does, in order, each step failing closed:

1. ``store.runs.start`` (conditional; a finished run is a no-op, a redelivered running run a takeover);
2. re-verify the room's signed manifest itself, under the owner key from the Tenants table;
3. check this runner's **own** compose hash against the room's ``runner_trust`` (§16.1);
4. open the run envelope (room, expiry, nonce spent for this run id only), and check that it names the
   manifest just verified and the run row's room, bearer and prompt hash;
5. unwrap the room DEK with the bearer's wrap and the envelope's wrap key;
6. stream-decrypt every committed item into the run's tmpfs workspace;
7. fetch each stage's agent source (sealed ones decrypted with the key sealed to this runner), extract
   it, recompute its source digest and refuse a mismatch with the pinned one;
8. run the pipeline, reporting stages to the run row;
9. seal the output (and artifacts, if the room allows them) under a fresh key sealed to the requester
   (and the owner when the room says so), sign the receipt, write both;
10. finish the run with a conditional write, then queue the settlement message.

Any failure ends the run ``failed`` with an error **code** (never a message: messages may quote room
data) and a signed failed receipt, and still sends the settlement that releases the hold. Transient
storage trouble leaves the message for redelivery instead, until the last attempt.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO, Protocol

from pydantic import ValidationError

from hivemind.archive import extract_archive
from hivemind.envelope import RunEnvelope, SealedEnvelope, open_agent_key, open_run_envelope
from hivemind.errors import (
    Conflict,
    EnvelopeError,
    Forbidden,
    HivemindError,
    IntegrityError,
    ManifestError,
    NotFound,
    ServiceUnavailable,
)
from hivemind.keys import unwrap_dek
from hivemind.manifest import AgentRef, RoomManifest, SignedManifest, manifest_hash, verify_manifest
from hivemind.models import Budgets, ObjectKind, QueryMode, RunStatus, Stage, StageUsage, Visibility
from hivemind.receipt import ReceiptAgent
from hivemind.seal import SealContext, agent_source_context, open_stream
from hivemind.store import Store
from hivemind.store.agents import AgentRecord
from hivemind.store.blobs import StoredObject
from hivemind.store.rooms import RoomItem as StoredItem
from hivemind.store.rooms import RoomStatus
from hivemind.store.runs import RunRecord, RunResult
from hivemind.trust import SignedRelease, check_runner_trust
from hivemind_runner.keys import RunnerKeys
from hivemind_runner.outputs import (
    RunnerIdentity,
    SettlementMessage,
    StoredOutputs,
    build_receipt,
    seal_and_store_outputs,
    send_settlement,
    store_receipt,
)
from hivemind_runner.pipeline import PipelineInputs, PipelineResult, RoomItem, StageAgent
from hivemind_runner.sandbox.base import SourceDigestMismatch
from hivemind_runner.tee import TeeIdentity
from hivemind_runner.telemetry import (
    PhaseClock,
    RunTimer,
    StructuredLogger,
    aggregate_llm_usage,
    usage_summary,
)
from hivemind_runner.workspace import RunWorkspace, WorkspaceFactory

GAVE_UP = "runner_gave_up"
_ERROR_CODE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


class PipelineRunner(Protocol):
    """What the lifecycle needs from :class:`hivemind_runner.pipeline.Pipeline`."""

    def run(self, inputs: PipelineInputs, on_stage: Callable[[Stage], None]) -> PipelineResult: ...


class RunOutcome(StrEnum):
    """What the worker does with the queue message afterwards."""

    FINISHED = "finished"  # the run's terminal state is durably written (now or before): delete it
    RETRY = "retry"  # transient trouble: leave it, SQS redelivers
    UNKNOWN_RUN = "unknown_run"  # no such run: a poison message, left for the DLQ
    LOST = "lost"  # another attempt took the run over: leave the message to it


class _RunLost(Exception):
    """This attempt no longer owns the run (a takeover happened); stop without writing anything."""


@dataclass
class _Progress:
    """What an attempt learned so far; a failed receipt records as much of it as exists."""

    agents: list[ReceiptAgent] = field(default_factory=list)
    usage: list[StageUsage] = field(default_factory=list)
    llm_usage: list[dict[str, object]] = field(default_factory=list)
    scope_policy_hash: str | None = None
    # Where the attempt's time went (the ``run_finished`` log's ``phase_ms``).
    phases: PhaseClock = field(default_factory=PhaseClock)


@dataclass(frozen=True)
class _Completed:
    outputs: StoredOutputs
    result: PipelineResult


class _ChunkReader(io.RawIOBase):
    """A readable stream over an iterator of byte chunks (a bucket object being downloaded)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        super().__init__()
        self._chunks = chunks
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = memoryview(chunk)
        count = min(len(buffer), len(self._pending))
        buffer[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count


def error_code_of(exc: BaseException) -> str:
    """The code a failed run records: the error's stable code, never its message."""
    if isinstance(exc, HivemindError) and _ERROR_CODE.fullmatch(exc.code):
        return exc.code
    if isinstance(exc, OSError) and exc.errno == 28:  # ENOSPC: the workspace's tmpfs is full
        return "workspace_full"
    return "internal_error"


def effective_budgets(manifest: RoomManifest, requested: Budgets, admitted: Budgets) -> Budgets:
    """The request clamped to the room's maxima (checked here, not trusted from the control plane) and
    to what the control plane admitted and holds money for."""
    clamped = manifest.budgets.clamp(requested)
    return Budgets(
        **{name: min(getattr(clamped, name), getattr(admitted, name)) for name in Budgets.model_fields}
    )


class RunLifecycle:
    """Executes runs for one runner. Thread-safe: the worker calls :meth:`execute` from its pool."""

    def __init__(
        self,
        store: Store,
        keys: RunnerKeys,
        *,
        runner_id: str,
        identity: TeeIdentity,
        quote_sha256: str,
        pipeline: PipelineRunner,
        workspaces: WorkspaceFactory,
        max_attempts: int,
        release: SignedRelease | None = None,
        logger: StructuredLogger | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts is at least 1")
        self._store = store
        self._keys = keys
        self._runner_id = runner_id
        self._identity = identity
        self._runner = RunnerIdentity(compose_hash=identity.compose_hash, quote_sha256=quote_sha256)
        self._pipeline = pipeline
        self._workspaces = workspaces
        self._max_attempts = max_attempts
        self._release = release
        self._logger = logger or StructuredLogger()

    # --- entry point -------------------------------------------------------------------------------

    def execute(self, run_id: str, *, receive_count: int) -> RunOutcome:
        log = self._logger.bind(run_id=run_id, attempt=receive_count)
        phases = PhaseClock()
        run = self._store.runs.get(run_id)
        if run is None:
            log.warning("run_unknown")
            return RunOutcome.UNKNOWN_RUN
        if run.status.terminal:
            self._resend_settlement(run, log)
            return RunOutcome.FINISHED
        if receive_count > self._max_attempts:
            return self._give_up(run, log)
        try:
            started = self._store.runs.start(run_id, self._runner_id)
        except Conflict as exc:
            if exc.code != "run_finished":
                raise
            self._resend_settlement(self._store.runs.require(run_id), log)
            return RunOutcome.FINISHED
        phases.lap("start")
        try:
            return self._run_started(started, receive_count, log.bind(room_id=started.room_id), phases)
        except _RunLost:
            log.warning("run_lost")
            return RunOutcome.LOST

    def _run_started(
        self, started: RunRecord, receive_count: int, log: StructuredLogger, phases: PhaseClock
    ) -> RunOutcome:
        log.event("run_started", takeover=started.attempts > 1)
        timer = RunTimer()
        progress = _Progress(phases=phases)
        completed: _Completed | None = None
        error_code: str | None = None
        try:
            with self._workspaces.open(started.run_id) as workspace:
                completed = self._attempt(started, workspace, progress, log)
            progress.phases.lap("wipe")
        except _RunLost:
            raise
        except ServiceUnavailable as exc:
            if receive_count < self._max_attempts:
                log.warning("run_retry", error_code=exc.code)
                return RunOutcome.RETRY
            error_code = error_code_of(exc)
        except Exception as exc:
            error_code = error_code_of(exc)
            log.event(
                "run_step_failed", level=logging.WARNING, error_code=error_code, error_type=type(exc).__name__
            )
        if error_code is not None:
            completed = None
            progress.phases.lap("failed_step")
        return self._finish(started, progress, timer, log, completed=completed, error_code=error_code)

    # --- the steps ---------------------------------------------------------------------------------

    def _attempt(
        self, run: RunRecord, workspace: RunWorkspace, progress: _Progress, log: StructuredLogger
    ) -> _Completed:
        """Steps 2-9: the stored outputs of a successful run; any failure raises."""
        phases = progress.phases
        manifest = self._verified_manifest(run)
        check_runner_trust(
            self._identity.compose_hash, manifest.runner_trust, self._release, app_id=self._identity.app_id
        )
        phases.lap("verify")
        envelope = self._open_envelope(run, manifest)
        dek = self._room_key(run, envelope)
        phases.lap("envelope")
        # The agents are fetched while the items are decrypted; both are finished before either's
        # failure is reported (the items' first), so nothing writes into a workspace being wiped.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="agents") as pool:
            fetching = pool.submit(self._fetch_agents, manifest, envelope, workspace)
            items = self._decrypt_items(manifest, dek, workspace)
            agents = fetching.result()
        phases.lap("inputs")
        inputs = PipelineInputs(
            run_id=run.run_id,
            manifest=manifest,
            prompt=envelope.prompt,
            budgets=effective_budgets(manifest, envelope.budgets, run.budgets),
            workspace=workspace.root,
            items=items,
            agents=agents,
            payer_tenant_id=run.payer_tenant_id,
        )
        log.event("pipeline_started", items=len(items), stages=[stage.value for stage in agents])
        lost: list[bool] = []

        def on_stage(stage: Stage) -> None:
            try:
                self._store.runs.set_stage(run.run_id, self._runner_id, stage)
            except Conflict as exc:
                if exc.code == "run_not_owned":
                    lost.append(True)
                    raise _RunLost from None
                raise
            except ServiceUnavailable:
                # Progress is informational; the run goes on.
                log.warning("stage_report_failed", stage=stage.value)
            log.event("stage_started", stage=stage.value)

        result = self._pipeline.run(inputs, on_stage)
        phases.lap("pipeline", result.phases)
        if lost:
            raise _RunLost
        self._check_result_agents(result, agents)
        progress.agents = list(result.agents)
        progress.usage = list(result.usage)
        progress.llm_usage = list(result.llm_usage)
        progress.scope_policy_hash = result.scope_policy_hash
        if not result.ok:
            code = (
                result.error_code if result.error_code and _ERROR_CODE.fullmatch(result.error_code) else None
            )
            raise HivemindError("the pipeline refused or failed", code=code or "pipeline_failed")
        if result.output is None or result.scope_policy_hash is None:
            raise HivemindError("the pipeline succeeded without an output", code="pipeline_failed")
        artifacts = self._allowed_artifacts(manifest, result, workspace, log)
        self._ensure_owner(run)
        outputs = seal_and_store_outputs(
            self._store,
            run_id=run.run_id,
            manifest=manifest,
            reply_pub=envelope.reply_public_bytes(),
            output=result.output,
            artifacts=artifacts,
            scratch=workspace.scratch,
        )
        phases.lap("seal")
        return _Completed(outputs=outputs, result=result)

    def _verified_manifest(self, run: RunRecord) -> RoomManifest:
        room = self._store.rooms.get(run.room_id)
        if room is None:
            raise NotFound("the run's room does not exist", code="room_not_found")
        if room.status is RoomStatus.DELETED or room.envelope is None:
            raise NotFound("the run's room was deleted", code="room_deleted")
        try:
            signed = SignedManifest.model_validate(room.envelope)
        except ValidationError:
            raise ManifestError("the stored room manifest is not a signed manifest") from None
        owner = self._store.tenants.get(room.tenant_id)
        if owner is None:
            raise ManifestError("the room's owner is unknown")
        manifest = verify_manifest(
            signed,
            expected_owner_sign_pub=owner.owner_sign_pub,
            expected_room_id=run.room_id,
            min_revision=None,
        )
        if manifest.tenant_id != room.tenant_id:
            raise ManifestError("the manifest names another owner than the room")
        if manifest_hash(manifest) != run.manifest_hash:
            raise ManifestError(
                "the room's manifest is not the one the run was admitted for", code="manifest_mismatch"
            )
        return manifest

    def _open_envelope(self, run: RunRecord, manifest: RoomManifest) -> RunEnvelope:
        raw = self._store.blobs.get_bytes(run.envelope_key, max_size=4 * 1024 * 1024)
        sealed = SealedEnvelope.from_json(raw)
        envelope = open_run_envelope(
            self._keys.hpke,
            sealed,
            room_id=run.room_id,
            now=self._store.clock(),
            replay_guard=self._store.nonces.guard_for_run(run.run_id),
        )
        # The envelope is the client's own word (sealed to this runner): it outranks the run row.
        if envelope.manifest_hash != manifest_hash(manifest):
            raise ManifestError(
                "the run envelope names another manifest than the room's", code="manifest_mismatch"
            )
        if envelope.prompt_sha256() != run.prompt_sha256:
            raise EnvelopeError("the run row's prompt hash is not the envelope's prompt")
        if envelope.bearer_id != run.caller_id:
            raise EnvelopeError("the run envelope names another bearer than the caller")
        return envelope

    def _room_key(self, run: RunRecord, envelope: RunEnvelope) -> bytes:
        wrap = self._store.rooms.get_wrap(run.room_id, envelope.bearer_id)
        if wrap is None:
            raise Forbidden("the bearer has no key wrap in this room (revoked?)", code="wrap_missing")
        return unwrap_dek(
            envelope.wrap_key_bytes(), wrap.wrapped, room_id=run.room_id, bearer_id=envelope.bearer_id
        )

    def _committed_items(self, room_id: str) -> Iterator[StoredItem]:
        cursor: str | None = None
        while True:
            page = self._store.rooms.list_items(room_id, cursor=cursor)
            yield from page.items
            if page.cursor is None:
                return
            cursor = page.cursor

    def _open_sealed_object(
        self, stored: StoredObject, sink: BinaryIO, *, key: bytes, context: SealContext, what: str
    ) -> None:
        """Stream-decrypt a pinned bucket object into ``sink`` and check it is the committed object."""
        source = _ChunkReader(self._store.blobs.iter_chunks(stored.key, version_id=stored.version_id))
        stats = open_stream(source, sink, key=key, context=context)
        if (stats.sealed_size, stats.sealed_sha256) != (stored.size, stored.sha256):
            raise IntegrityError(
                f"{what} is not the object that was committed", code="object_checksum_mismatch"
            )

    def _decrypt_items(self, manifest: RoomManifest, dek: bytes, workspace: RunWorkspace) -> list[RoomItem]:
        items: list[RoomItem] = []
        for stored in self._committed_items(manifest.room_id):
            path = workspace.items / f"item-{len(items)}"
            context = SealContext(
                tenant_id=manifest.tenant_id,
                room_id=manifest.room_id,
                kind=ObjectKind.ITEM,
                object_id=stored.item_id,
            )
            pinned = StoredObject(
                key=stored.s3_key, size=stored.size, sha256=stored.sha256, version_id=stored.version_id
            )
            with path.open("xb") as sink:
                path.chmod(0o600)
                self._open_sealed_object(pinned, sink, key=dek, context=context, what="a room item")
            items.append(
                RoomItem(
                    item_id=stored.item_id,
                    name=stored.metadata.get("name", stored.item_id),
                    content_type=stored.content_type,
                    metadata=dict(stored.metadata),
                    path=path,
                )
            )
        return items

    def _stage_refs(
        self, manifest: RoomManifest, envelope: RunEnvelope
    ) -> list[tuple[Stage, AgentRef | str]]:
        """Each stage's agent: a pinned reference, or (uploadable query) the agent id the client sealed."""
        refs: list[tuple[Stage, AgentRef | str]] = [(Stage.SCOPE, manifest.scope)]
        query = manifest.query
        if query.mode is QueryMode.FIXED:
            if envelope.query_agent_id is not None and envelope.query_agent_id != query.agent_id:
                raise Forbidden("this room's query agent is fixed", code="query_agent_not_allowed")
            assert query.agent_id is not None and query.digest is not None  # QueryRule guarantees both
            refs.append(
                (
                    Stage.QUERY,
                    AgentRef(agent_id=query.agent_id, digest=query.digest, visibility=query.visibility),
                )
            )
        else:
            if envelope.query_agent_id is None:
                raise Forbidden("this room needs the participant's query agent", code="query_agent_missing")
            refs.append((Stage.QUERY, envelope.query_agent_id))
        if manifest.mediator is not None:
            refs.append((Stage.MEDIATOR, manifest.mediator))
        return refs

    def _fetch_agents(
        self, manifest: RoomManifest, envelope: RunEnvelope, workspace: RunWorkspace
    ) -> dict[Stage, StageAgent]:
        """Every stage's agent, fetched and checked concurrently (each is a few storage round trips).

        A failure is reported for the first failing stage in pipeline order, after every fetch ended.
        """
        refs = self._stage_refs(manifest, envelope)
        with ThreadPoolExecutor(max_workers=len(refs), thread_name_prefix="agent-fetch") as pool:
            fetches = [pool.submit(self._fetch_agent, manifest, stage, ref, workspace) for stage, ref in refs]
            wait(fetches)
        return {stage: fetch.result() for (stage, _), fetch in zip(refs, fetches, strict=True)}

    def _fetch_agent(
        self, manifest: RoomManifest, stage: Stage, ref: AgentRef | str, workspace: RunWorkspace
    ) -> StageAgent:
        if isinstance(ref, AgentRef):
            agent_id, visibility, pinned = ref.agent_id, ref.visibility, ref.digest
            record = self._agent_record(agent_id)
        else:
            agent_id, visibility = ref, manifest.query.visibility
            record = self._agent_record(agent_id)
            if record.room_id != manifest.room_id:
                raise Forbidden(
                    "the query agent was not uploaded for this room", code="query_agent_not_allowed"
                )
            pinned = record.source_digest
        if record.visibility is not visibility:
            raise IntegrityError("the agent's visibility is not the room's", code="agent_visibility_mismatch")
        if record.source_digest != pinned:
            raise SourceDigestMismatch("the stored agent is not the source the room pins")
        return self._extract_agent(stage, record, pinned, workspace)

    def _agent_record(self, agent_id: str) -> AgentRecord:
        try:
            return self._store.agents.require_active(agent_id)
        except NotFound:
            raise NotFound("an agent of the run is missing", code="agent_missing") from None

    def _extract_agent(
        self, stage: Stage, record: AgentRecord, pinned: str, workspace: RunWorkspace
    ) -> StageAgent:
        if record.source_object is None:
            raise NotFound("an agent of the run has no committed source", code="agent_missing")
        archive = workspace.scratch / f"{stage.value}-source.tar.gz"
        with archive.open("xb") as sink:
            if record.visibility is Visibility.SEALED:
                context = agent_source_context(record.tenant_id, record.room_id, record.agent_id)
                self._open_sealed_object(
                    record.source_object,
                    sink,
                    key=self._agent_key(record),
                    context=context,
                    what="a sealed agent",
                )
            else:
                self._store.blobs.download_verified(record.source_object, sink)
        source_dir = workspace.agents / stage.value
        files = extract_archive(archive, source_dir)
        archive.unlink()
        # The digest is recomputed from the files just extracted: neither the uploader's declaration
        # nor the control plane's check is trusted.
        if files.digest != pinned:
            raise SourceDigestMismatch("the agent source does not have the digest the room pins")
        return StageAgent(
            stage=stage,
            agent_id=record.agent_id,
            source_dir=source_dir,
            source_digest=files.digest,
            visibility=record.visibility,
        )

    def _agent_key(self, record: AgentRecord) -> bytes:
        if record.sealed_key is None:
            raise IntegrityError("a sealed agent has no key sealed to the runner", code="agent_key_missing")
        return open_agent_key(
            self._keys.hpke, SealedEnvelope.model_validate(record.sealed_key), agent_id=record.agent_id
        )

    def _check_result_agents(self, result: PipelineResult, agents: dict[Stage, StageAgent]) -> None:
        """The receipt may only name the agents this runner verified, with the digests it verified."""
        for entry in result.agents:
            verified = agents.get(entry.stage)
            if verified is None or (entry.agent_id, entry.source_digest) != (
                verified.agent_id,
                verified.source_digest,
            ):
                raise IntegrityError(
                    "the pipeline reports an agent this runner did not verify", code="internal_error"
                )
        if result.ok and {entry.stage for entry in result.agents} != set(agents):
            raise IntegrityError("the pipeline did not report every stage it ran", code="internal_error")

    def _allowed_artifacts(
        self, manifest: RoomManifest, result: PipelineResult, workspace: RunWorkspace, log: StructuredLogger
    ) -> dict[str, Path]:
        if not result.artifacts:
            return {}
        if not manifest.egress.artifacts:
            # Never leaves the TEE: the room does not allow artifacts.
            log.warning("artifacts_dropped", count=len(result.artifacts))
            return {}
        root = workspace.root.resolve()
        for path in result.artifacts.values():
            if not path.resolve().is_relative_to(root) or not path.is_file():
                raise IntegrityError(
                    "an artifact is not a file of the run's workspace", code="artifact_invalid"
                )
        return dict(result.artifacts)

    # --- finishing ---------------------------------------------------------------------------------

    def _ensure_owner(self, run: RunRecord) -> None:
        """Refuse to write anything if another attempt took the run over meanwhile."""
        current = self._store.runs.require(run.run_id)
        if (current.status, current.runner_id, current.attempts) != (
            RunStatus.RUNNING,
            self._runner_id,
            run.attempts,
        ):
            raise _RunLost

    def _finish(
        self,
        run: RunRecord,
        progress: _Progress,
        timer: RunTimer,
        log: StructuredLogger,
        *,
        completed: _Completed | None,
        error_code: str | None,
    ) -> RunOutcome:
        if completed is not None:
            progress.agents = list(completed.result.agents)
        finished_at = self._store.clock()
        receipt = build_receipt(
            run_id=run.run_id,
            room_id=run.room_id,
            manifest_hash=run.manifest_hash,
            prompt_sha256=run.prompt_sha256,
            runner=self._runner,
            signer_pub=self._keys.sign_pub,
            agents=progress.agents,
            scope_policy_hash=progress.scope_policy_hash,
            outputs=completed.outputs if completed is not None else None,
            error_code=error_code,
            usage=progress.usage,
            started_at=run.started_at or finished_at,
            finished_at=finished_at,
        )
        signed = self._keys.sign_receipt(receipt)
        self._ensure_owner(run)
        receipt_key = store_receipt(self._store, run.run_id, signed)
        progress.phases.lap("receipt")
        outputs = completed.outputs if completed is not None else None
        status = RunStatus.COMPLETED if error_code is None else RunStatus.FAILED
        result = RunResult(
            usage=progress.usage,
            receipt_key=receipt_key,
            output_key=outputs.output_key if outputs else None,
            artifact_names=outputs.artifact_names if outputs else [],
            sealed_output_keys=dict(outputs.sealed_keys) if outputs else {},
            error_code=error_code,
        )
        try:
            transition = self._store.runs.finish(run.run_id, status, result)
        except Conflict as exc:
            if exc.code != "illegal_run_transition":
                raise
            # Expired or failed by the janitor meanwhile: that state stands; the janitor releases the hold.
            log.warning("run_finish_refused", error_code=exc.code)
            return RunOutcome.FINISHED
        progress.phases.lap("finish")
        if not transition.applied:
            log.warning("run_already_finished")
            return RunOutcome.FINISHED
        send_settlement(
            self._store,
            SettlementMessage(
                run_id=run.run_id,
                usage=progress.usage,
                runner_seconds=timer.seconds(),
                llm=aggregate_llm_usage(progress.llm_usage),
            ),
        )
        progress.phases.lap("settle")
        log.event(
            "run_finished",
            status=status.value,
            error_code=error_code,
            runner_seconds=timer.seconds(),
            artifacts=len(result.artifact_names),
            phase_ms=progress.phases.phases(),
            **usage_summary(progress.usage),
        )
        return RunOutcome.FINISHED

    def _give_up(self, run: RunRecord, log: StructuredLogger) -> RunOutcome:
        """The message came back more often than the runner tries: fail the run and release its hold."""
        log.warning("run_gave_up")
        try:
            started = self._store.runs.start(run.run_id, self._runner_id)
        except Conflict:
            self._resend_settlement(self._store.runs.require(run.run_id), log)
            return RunOutcome.FINISHED
        return self._finish(started, _Progress(), RunTimer(), log, completed=None, error_code=GAVE_UP)

    def _resend_settlement(self, run: RunRecord, log: StructuredLogger) -> None:
        """A finished run's message came back: its settlement may have been lost in a crash between
        finishing and sending, so send it again (settlement is idempotent per run).

        The run row keeps per-stage usage but not tokens per provider and model, so a re-sent settlement
        charges runner time only; it never charges more than the original would have.
        """
        if run.status not in (RunStatus.COMPLETED, RunStatus.FAILED) or run.runner_id is None:
            return
        runner_ms = sum(stage.duration_ms for stage in run.usage)
        send_settlement(
            self._store,
            SettlementMessage(
                run_id=run.run_id, usage=run.usage, runner_seconds=-(-runner_ms // 1000), llm=[]
            ),
        )
        log.event("settlement_resent", status=run.status.value)
