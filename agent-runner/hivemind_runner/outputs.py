"""Everything that leaves the TEE after a run: the sealed output and artifacts, the signed receipt, and
the settlement message (DESIGN §7 steps 5-6).

Output and artifacts are HMS1 under one fresh 32-byte output key per run:

- the output with ``SealContext(tenant_id=<room owner>, room_id, kind=output, object_id=<run id>)``;
- each artifact with ``SealContext(tenant_id=<room owner>, room_id, kind=artifact, object_id=<name>)``.

The output key is HPKE-sealed (``hivemind.envelope.seal_output_key``) to the run envelope's
``reply_pub`` (role ``querier``) and, only when the room says ``owner_and_querier``, to the manifest's
``owner_box_pub`` (role ``owner``). Nothing else leaves: no plaintext, no key in the clear, and error
messages never carry room data (a failed run reports an error *code*).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import Field, TypeAdapter, ValidationError

from hivemind.encoding import b64decode
from hivemind.envelope import OUTPUT_KEY_BYTES, OutputRecipient, SealedEnvelope, seal_output_key
from hivemind.errors import IntegrityError, InvalidInput
from hivemind.manifest import RoomManifest
from hivemind.models import ObjectKind, OutputVisibility, RunStatus, StageUsage, StrictModel
from hivemind.receipt import (
    ArtifactDigests,
    ArtifactName,
    OutputDigests,
    Receipt,
    ReceiptAgent,
    SignedReceipt,
    UsageTotals,
)
from hivemind.seal import SealContext, seal_bytes, seal_stream
from hivemind.store import Store
from hivemind.store.base import raise_store_error
from hivemind.store.schema import QueueRole, run_artifact_key, run_output_key, run_receipt_key
from hivemind_runner.telemetry import LlmUsage

_ARTIFACT_NAME: TypeAdapter[str] = TypeAdapter(ArtifactName)


def output_context(*, owner_tenant_id: str, room_id: str, run_id: str) -> SealContext:
    return SealContext(tenant_id=owner_tenant_id, room_id=room_id, kind=ObjectKind.OUTPUT, object_id=run_id)


def artifact_context(*, owner_tenant_id: str, room_id: str, name: str) -> SealContext:
    return SealContext(tenant_id=owner_tenant_id, room_id=room_id, kind=ObjectKind.ARTIFACT, object_id=name)


@dataclass(frozen=True)
class StoredOutputs:
    """What :func:`seal_and_store_outputs` wrote, for the receipt and the run row."""

    output_key: str
    output: OutputDigests
    artifacts: list[ArtifactDigests]
    sealed_keys: dict[OutputRecipient, SealedEnvelope]

    @property
    def artifact_names(self) -> list[str]:
        return [artifact.name for artifact in self.artifacts]


def seal_output_keys(
    output_key: bytes, *, run_id: str, reply_pub: bytes, manifest: RoomManifest
) -> dict[OutputRecipient, SealedEnvelope]:
    """The output key sealed to the querier, and to the owner only if the room shows outputs to it."""
    sealed = {
        OutputRecipient.QUERIER: seal_output_key(
            output_key, reply_pub, run_id=run_id, recipient=OutputRecipient.QUERIER
        )
    }
    if manifest.output.visibility is OutputVisibility.OWNER_AND_QUERIER:
        sealed[OutputRecipient.OWNER] = seal_output_key(
            output_key, b64decode(manifest.owner_box_pub), run_id=run_id, recipient=OutputRecipient.OWNER
        )
    return sealed


def seal_and_store_outputs(
    store: Store,
    *,
    run_id: str,
    manifest: RoomManifest,
    reply_pub: bytes,
    output: bytes,
    artifacts: dict[str, Path],
    scratch: Path,
) -> StoredOutputs:
    """Seal the output and the artifacts under a fresh key, write them to the bucket, seal the key.

    ``artifacts`` must already be filtered by the room's egress rule; their names are checked against the
    receipt's artifact-name rule here again.
    """
    output_key = os.urandom(OUTPUT_KEY_BYTES)
    owner, room_id = manifest.tenant_id, manifest.room_id
    sealed_output = seal_bytes(
        output, key=output_key, context=output_context(owner_tenant_id=owner, room_id=room_id, run_id=run_id)
    )
    stored = store.blobs.put_bytes(run_output_key(run_id), sealed_output)
    output_digests = OutputDigests(
        ciphertext_sha256=stored.sha256, plaintext_sha256=hashlib.sha256(output).hexdigest()
    )
    artifact_digests: list[ArtifactDigests] = []
    for name in sorted(artifacts):
        try:
            _ARTIFACT_NAME.validate_python(name)
        except ValidationError:
            raise InvalidInput("an artifact name is not allowed", code="artifact_invalid") from None
        sealed_path = scratch / f"artifact-{len(artifact_digests)}"
        context = artifact_context(owner_tenant_id=owner, room_id=room_id, name=name)
        with artifacts[name].open("rb") as source, sealed_path.open("wb") as sink:
            stats = seal_stream(source, sink, key=output_key, context=context)
        with sealed_path.open("rb") as sealed:
            stored_artifact = store.blobs.put_stream(run_artifact_key(run_id, name), sealed)
        sealed_path.unlink()
        if stored_artifact.sha256 != stats.sealed_sha256:
            raise IntegrityError(
                "a sealed artifact changed on its way to the bucket", code="artifact_invalid"
            )
        artifact_digests.append(
            ArtifactDigests(
                name=name, ciphertext_sha256=stats.sealed_sha256, plaintext_sha256=stats.plaintext_sha256
            )
        )
    return StoredOutputs(
        output_key=stored.key,
        output=output_digests,
        artifacts=artifact_digests,
        sealed_keys=seal_output_keys(output_key, run_id=run_id, reply_pub=reply_pub, manifest=manifest),
    )


# --- receipts --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunnerIdentity:
    """What every receipt of this runner states about the runner itself."""

    compose_hash: str
    quote_sha256: str


def build_receipt(
    *,
    run_id: str,
    room_id: str,
    manifest_hash: str,
    prompt_sha256: str,
    runner: RunnerIdentity,
    signer_pub: str,
    agents: list[ReceiptAgent],
    scope_policy_hash: str | None,
    outputs: StoredOutputs | None,
    error_code: str | None,
    usage: list[StageUsage],
    started_at: int,
    finished_at: int,
) -> Receipt:
    """A receipt with every field of §7 step 5; completed iff ``outputs`` is given and no error."""
    status = RunStatus.COMPLETED if error_code is None else RunStatus.FAILED
    return Receipt(
        run_id=run_id,
        status=status,
        room_id=room_id,
        manifest_hash=manifest_hash,
        compose_hash=runner.compose_hash,
        quote_hash=runner.quote_sha256,
        agents=agents,
        scope_policy_hash=scope_policy_hash,
        prompt_sha256=prompt_sha256,
        output=outputs.output if outputs is not None and error_code is None else None,
        artifacts=outputs.artifacts if outputs is not None and error_code is None else [],
        error_code=error_code,
        usage=usage,
        totals=UsageTotals.of(usage),
        started_at=started_at,
        finished_at=max(finished_at, started_at),
        signer_pub=signer_pub,
    )


def store_receipt(store: Store, run_id: str, signed: SignedReceipt) -> str:
    """Write ``runs/{run}/receipt.json``; returns its key."""
    key = run_receipt_key(run_id)
    store.blobs.put_bytes(key, signed.to_json().encode(), content_type="application/json")
    return key


# --- settlement ------------------------------------------------------------------------------------


class SettlementMessage(StrictModel):
    """What the settle function prices: per-stage usage, runner seconds, tokens per provider and model."""

    run_id: str = Field(pattern=r"^[a-z][a-z0-9]*_[a-z0-9]{1,64}$")
    usage: list[StageUsage] = Field(default_factory=list, max_length=3)
    runner_seconds: int = Field(ge=0)
    llm: list[LlmUsage] = Field(default_factory=list)


def send_settlement(store: Store, message: SettlementMessage) -> None:
    """Queue the settlement; the settle function is idempotent per run, so sending twice is harmless."""
    clients = store.clients
    try:
        clients.sqs.send_message(
            QueueUrl=clients.queue_url(QueueRole.SETTLEMENTS), MessageBody=message.model_dump_json()
        )
    except (ClientError, BotoCoreError) as exc:
        raise_store_error(exc, "send the settlement")
