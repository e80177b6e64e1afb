"""One run through the runner's lifecycle, with a fake pipeline: every check of §7 step 4-6 and §16.1."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pytest
from boto3.dynamodb.types import TypeSerializer
from support.rooms import (
    Room,
    Tenant,
    add_invite,
    agent_ref,
    build_envelope,
    build_manifest,
    create_room,
    open_output,
    post_run,
    read_receipt,
    seal_item,
    submit_run,
    upload_agent,
    write_agent_dir,
)
from support.runner_harness import (
    IMAGE_DIGEST,
    SCOPE_POLICY_HASH,
    TEST_COMPOSE_HASH,
    FakePipeline,
    HarnessRunner,
    make_runner,
)

from hivemind.archive import pack_directory
from hivemind.envelope import OutputRecipient, open_output_key, seal_run_envelope
from hivemind.errors import EnvelopeError
from hivemind.manifest import sign_manifest
from hivemind.models import OutputVisibility, RunStatus, Stage, Visibility
from hivemind.receipt import ReceiptExpectations, SignedReceipt, verify_artifact, verify_receipt
from hivemind.seal import SealContext, open_bytes
from hivemind.store import Store
from hivemind.store.schema import QueueRole, TableRole, item_key, run_artifact_key, run_receipt_key
from hivemind_runner.lifecycle import RunOutcome

pytestmark = pytest.mark.moto_server

SALES = b"region,amount\nnorth,10\nsouth,20\n"
NOTES = b"quarterly notes: confidential\n"


@pytest.fixture
def pipeline(store: Store) -> FakePipeline:
    return FakePipeline(store=store)


@pytest.fixture
def runner(store: Store, tmp_path: Path, pipeline: FakePipeline) -> HarnessRunner:
    return make_runner(store, tmp_path / "runner", pipeline)


def make_room(
    store: Store,
    tmp_path: Path,
    *,
    output: OutputVisibility = OutputVisibility.QUERIER_ONLY,
    artifacts: bool = False,
    compose_hashes: list[str] | None = None,
    uploadable: bool = False,
) -> Room:
    owner = Tenant.create(store, "owner")
    agents = {
        name: upload_agent(store, owner, write_agent_dir(tmp_path / "agents" / name, body=f"# {name}\n"))
        for name in ("scope", "query", "mediator")
    }
    manifest = build_manifest(
        owner,
        room_id="room_" + hashlib.sha256(str(tmp_path).encode()).hexdigest()[:12],
        scope=agent_ref(agents["scope"]),
        query=None if uploadable else agent_ref(agents["query"]),
        mediator=agent_ref(agents["mediator"]),
        compose_hashes=compose_hashes or [TEST_COMPOSE_HASH],
        output=output,
        artifacts=artifacts,
    )
    room = create_room(store, owner, manifest)
    seal_item(store, room, SALES, item_id="item_sales", metadata={"name": "sales.csv", "table": "sales"})
    seal_item(store, room, NOTES, item_id="item_notes", content_type="text/plain")
    return room


def settlements(store: Store) -> list[dict[str, Any]]:
    url = store.clients.queue_url(QueueRole.SETTLEMENTS)
    bodies: list[dict[str, Any]] = []
    while True:
        response = store.clients.sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0)
        messages = response.get("Messages", [])
        if not messages:
            return bodies
        for message in messages:
            bodies.append(json.loads(message["Body"]))
            store.clients.sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])


def receipt_versions(store: Store, run_id: str) -> int:
    listing = store.clients.s3.list_object_versions(
        Bucket=store.config.bucket, Prefix=run_receipt_key(run_id)
    )
    return len(listing.get("Versions", []))


def workspace_leftovers(runner: HarnessRunner) -> list[Path]:
    return list(runner.workspaces.root.iterdir()) if runner.workspaces.root.exists() else []


# --- the success path --------------------------------------------------------------------------------


def test_run_completes_with_a_receipt_that_verifies_and_an_output_for_the_querier(
    store: Store, tmp_path: Path, runner: HarnessRunner, pipeline: FakePipeline
) -> None:
    room = make_room(store, tmp_path)
    submitted = submit_run(store, room, runner_keys=runner.keys.hpke_public_keys, prompt="total by region")
    assert store.runs.require(submitted.run_id).status is RunStatus.PENDING

    assert runner.lifecycle.execute(submitted.run_id, receive_count=1) is RunOutcome.FINISHED

    run = store.runs.require(submitted.run_id)
    assert run.status is RunStatus.COMPLETED and run.error_code is None and run.runner_id == runner.runner_id
    # The pipeline got the decrypted items, the prompt and each agent's extracted source.
    (seen,) = pipeline.seen
    assert seen.items == {"sales.csv": SALES, "item_notes": NOTES}
    assert seen.item_metadata["sales.csv"] == {"name": "sales.csv", "table": "sales"}
    assert seen.prompt == "total by region"
    assert seen.agent_files[Stage.QUERY]["main.py"] == b"# query\n"
    assert set(seen.agent_files) == {Stage.SCOPE, Stage.QUERY, Stage.MEDIATOR}
    assert seen.stages_reported == [Stage.SCOPE, Stage.QUERY, Stage.MEDIATOR]
    assert seen.run_stage_in_store == [Stage.SCOPE, Stage.QUERY, Stage.MEDIATOR]

    # The client's view: verify the attested runner, then the receipt against its key and the output.
    verified = runner.verified(room.manifest)
    output_blob = store.blobs.get_bytes(run.output_key or "")
    output = open_output(store, submitted.run_id, submitted.reply_key, room=room)
    receipt = verify_receipt(
        read_receipt(store, submitted.run_id),
        attested_sign_pub=verified.sign_pub,
        expected=ReceiptExpectations(
            run_id=submitted.run_id,
            room_id=room.room_id,
            manifest_hash=room.signed.manifest_hash,
            prompt_sha256=hashlib.sha256(b"total by region").hexdigest(),
            output_ciphertext_sha256=hashlib.sha256(output_blob).hexdigest(),
            output_plaintext_sha256=hashlib.sha256(output).hexdigest(),
            allowed_compose_hashes=frozenset(room.manifest.runner_trust.allowed_compose_hashes),
        ),
    )
    assert json.loads(output)["items"]["sales.csv"] == hashlib.sha256(SALES).hexdigest()
    assert receipt.status is RunStatus.COMPLETED
    assert receipt.compose_hash == TEST_COMPOSE_HASH
    assert receipt.quote_hash == hashlib.sha256(b"").hexdigest()  # simulated: no quote
    assert receipt.scope_policy_hash == SCOPE_POLICY_HASH
    assert [(agent.stage, agent.image_digest) for agent in receipt.agents] == [
        (Stage.SCOPE, IMAGE_DIGEST),
        (Stage.QUERY, IMAGE_DIGEST),
        (Stage.MEDIATOR, IMAGE_DIGEST),
    ]
    assert {agent.source_digest for agent in receipt.agents} == {
        room.manifest.scope.digest,
        room.manifest.query.digest,
        room.manifest.mediator.digest if room.manifest.mediator else None,
    }
    assert receipt.totals.tool_calls == 6 and receipt.started_at <= receipt.finished_at
    # The run row carries the telemetry (per-stage usage) and no owner key in a querier_only room.
    assert [usage.tool_calls for usage in run.usage] == [{"sql": 2}] * 3
    assert set(run.sealed_output_keys) == {"querier"}
    # Settlement: usage, runner seconds and tokens summed per provider and model.
    (settlement,) = settlements(store)
    assert settlement["run_id"] == submitted.run_id and len(settlement["usage"]) == 3
    assert settlement["llm"] == [
        {"provider": "openrouter", "model": "m1", "prompt_tokens": 11, "completion_tokens": 7}
    ]
    assert settlement["runner_seconds"] >= 0
    assert workspace_leftovers(runner) == []


def test_owner_gets_an_output_key_only_when_the_room_says_owner_and_querier(
    store: Store, tmp_path: Path, runner: HarnessRunner
) -> None:
    room = make_room(store, tmp_path, output=OutputVisibility.OWNER_AND_QUERIER)
    submitted = submit_run(store, room, runner_keys=runner.keys.hpke_public_keys)
    runner.lifecycle.execute(submitted.run_id, receive_count=1)
    run = store.runs.require(submitted.run_id)
    assert set(run.sealed_output_keys) == {"querier", "owner"}
    as_owner = open_output(
        store, submitted.run_id, room.owner.box_key, room=room, recipient=OutputRecipient.OWNER
    )
    assert as_owner == open_output(store, submitted.run_id, submitted.reply_key, room=room)
    # Each sealed key opens only for its own role.
    with pytest.raises(EnvelopeError):
        open_output_key(
            room.owner.box_key,
            run.sealed_output_keys["querier"],
            run_id=submitted.run_id,
            recipient=OutputRecipient.QUERIER,
        )


def test_invite_bearer_runs_with_its_own_wrap(store: Store, tmp_path: Path, runner: HarnessRunner) -> None:
    room = make_room(store, tmp_path)
    invite, bearer_id = add_invite(store, room)
    submitted = submit_run(
        store, room, runner_keys=runner.keys.hpke_public_keys, bearer_secret=invite, bearer_id=bearer_id
    )
    runner.lifecycle.execute(submitted.run_id, receive_count=1)
    assert store.runs.require(submitted.run_id).status is RunStatus.COMPLETED
    # The invite's wrap is removed (revoked): the next run fails closed.
    store.rooms.delete_wrap(room.room_id, bearer_id)
    again = submit_run(
        store, room, runner_keys=runner.keys.hpke_public_keys, bearer_secret=invite, bearer_id=bearer_id
    )
    runner.lifecycle.execute(again.run_id, receive_count=1)
    assert store.runs.require(again.run_id).error_code == "wrap_missing"


def test_artifacts_are_sealed_and_hashed_when_the_room_allows_them(
    store: Store, tmp_path: Path, pipeline: FakePipeline, runner: HarnessRunner
) -> None:
    pipeline.artifacts = {"chart.csv": b"north,10\n"}
    room = make_room(store, tmp_path, artifacts=True)
    submitted = submit_run(store, room, runner_keys=runner.keys.hpke_public_keys)
    runner.lifecycle.execute(submitted.run_id, receive_count=1)
    run = store.runs.require(submitted.run_id)
    assert run.artifact_names == ["chart.csv"]
    receipt = read_receipt(store, submitted.run_id).receipt
    sealed_key = run.sealed_output_keys["querier"]
    output_key = open_output_key(
        submitted.reply_key, sealed_key, run_id=submitted.run_id, recipient=OutputRecipient.QUERIER
    )
    blob = store.blobs.get_bytes(run_artifact_key(submitted.run_id, "chart.csv"))
    context = SealContext(
        tenant_id=room.owner.tenant_id, room_id=room.room_id, kind="artifact", object_id="chart.csv"
    )
    plaintext = open_bytes(blob, key=output_key, context=context)
    assert plaintext == b"north,10\n"
    verify_artifact(
        receipt,
        "chart.csv",
        ciphertext_sha256=hashlib.sha256(blob).hexdigest(),
        plaintext_sha256=hashlib.sha256(plaintext).hexdigest(),
    )


def test_artifacts_never_leave_when_the_room_forbids_them(
    store: Store, tmp_path: Path, pipeline: FakePipeline, runner: HarnessRunner
) -> None:
    pipeline.artifacts = {"dump.csv": SALES}
    room = make_room(store, tmp_path, artifacts=False)
    submitted = submit_run(store, room, runner_keys=runner.keys.hpke_public_keys)
    runner.lifecycle.execute(submitted.run_id, receive_count=1)
    run = store.runs.require(submitted.run_id)
    assert run.status is RunStatus.COMPLETED and run.artifact_names == []
    assert not store.blobs.exists(run_artifact_key(submitted.run_id, "dump.csv"))
    assert read_receipt(store, submitted.run_id).receipt.artifacts == []


def test_uploadable_room_runs_the_participants_query_agent(
    store: Store, tmp_path: Path, pipeline: FakePipeline, runner: HarnessRunner
) -> None:
    room = make_room(store, tmp_path, uploadable=True)
    participant = Tenant.create(store, "participant")
    mine = upload_agent(
        store, participant, write_agent_dir(tmp_path / "mine", body="# mine\n"), room_id=room.room_id
    )
    submitted = submit_run(
        store, room, runner_keys=runner.keys.hpke_public_keys, query_agent_id=mine.agent_id
    )
    runner.lifecycle.execute(submitted.run_id, receive_count=1)
    assert store.runs.require(submitted.run_id).status is RunStatus.COMPLETED
    assert pipeline.seen[-1].agent_files[Stage.QUERY]["main.py"] == b"# mine\n"

    # An agent uploaded for another room is refused, and so is a run that names none.
    elsewhere = upload_agent(store, participant, tmp_path / "mine", room_id="room_other")
    other = submit_run(
        store, room, runner_keys=runner.keys.hpke_public_keys, query_agent_id=elsewhere.agent_id
    )
    runner.lifecycle.execute(other.run_id, receive_count=1)
    assert store.runs.require(other.run_id).error_code == "query_agent_not_allowed"
    missing = submit_run(store, room, runner_keys=runner.keys.hpke_public_keys)
    runner.lifecycle.execute(missing.run_id, receive_count=1)
    assert store.runs.require(missing.run_id).error_code == "query_agent_missing"


def test_sealed_agent_source_is_opened_with_the_runner_key(
    store: Store, tmp_path: Path, pipeline: FakePipeline, runner: HarnessRunner
) -> None:
    owner = Tenant.create(store, "owner")
    plain = upload_agent(store, owner, write_agent_dir(tmp_path / "scope"))
    sealed = upload_agent(
        store,
        owner,
        write_agent_dir(tmp_path / "secret-query", body="# sealed strategy\n"),
        visibility=Visibility.SEALED,
        runner_keys=runner.keys.hpke_public_keys,
    )
    manifest = build_manifest(
        owner,
        room_id="room_sealedagent",
        scope=agent_ref(plain),
        query=agent_ref(sealed),
        compose_hashes=[TEST_COMPOSE_HASH],
    )
    room = create_room(store, owner, manifest)
    # The control plane holds only ciphertext.
    assert b"sealed strategy" not in store.blobs.get_bytes(sealed.source_key)
    submitted = submit_run(store, room, runner_keys=runner.keys.hpke_public_keys)
    runner.lifecycle.execute(submitted.run_id, receive_count=1)
    assert store.runs.require(submitted.run_id).status is RunStatus.COMPLETED
    assert pipeline.seen[-1].agent_files[Stage.QUERY]["main.py"] == b"# sealed strategy\n"

    # Sealed to another runner's keys: this runner cannot open it and the run fails closed.
    other_keys = make_runner(store, tmp_path / "other-runner", pipeline).keys
    foreign = upload_agent(
        store,
        owner,
        tmp_path / "secret-query",
        visibility=Visibility.SEALED,
        runner_keys=other_keys.hpke_public_keys,
    )
    manifest2 = build_manifest(
        owner,
        room_id="room_foreignkey",
        scope=agent_ref(plain),
        query=agent_ref(foreign),
        compose_hashes=[TEST_COMPOSE_HASH],
    )
    room2 = create_room(store, owner, manifest2)
    failing = submit_run(store, room2, runner_keys=runner.keys.hpke_public_keys)
    runner.lifecycle.execute(failing.run_id, receive_count=1)
    assert store.runs.require(failing.run_id).error_code == "envelope_invalid"


# --- refusals ----------------------------------------------------------------------------------------


def assert_failed(store: Store, runner: HarnessRunner, run_id: str, code: str) -> SignedReceipt:
    run = store.runs.require(run_id)
    assert (run.status, run.error_code) == (RunStatus.FAILED, code)
    assert run.output_key is None and run.sealed_output_keys == {}
    signed = read_receipt(store, run_id)
    assert signed.receipt.status is RunStatus.FAILED and signed.receipt.error_code == code
    assert signed.receipt.output is None
    # Failed runs still release their hold: a settlement message goes out.
    assert [message["run_id"] for message in settlements(store)] == [run_id]
    assert workspace_leftovers(runner) == []
    return signed


def test_runner_refuses_a_room_that_does_not_trust_its_compose_hash(
    store: Store, tmp_path: Path, pipeline: FakePipeline, runner: HarnessRunner
) -> None:
    """§16.1: room trust is enforced by the runner itself, not only by the client."""
    room = make_room(store, tmp_path, compose_hashes=["aa" * 32])
    submitted = submit_run(store, room, runner_keys=runner.keys.hpke_public_keys)
    assert runner.lifecycle.execute(submitted.run_id, receive_count=1) is RunOutcome.FINISHED
    signed = assert_failed(store, runner, submitted.run_id, "compose_hash_not_trusted")
    assert signed.receipt.compose_hash == TEST_COMPOSE_HASH
    # Refused before anything was opened: no pipeline, and the envelope's nonce is still unspent.
    assert pipeline.seen == []
    store.nonces.guard_for_run("run_probe").check_and_record(
        submitted.envelope.nonce, submitted.envelope.expires_at
    )


def test_replayed_envelope_under_another_run_is_refused(
    store: Store, tmp_path: Path, pipeline: FakePipeline, runner: HarnessRunner
) -> None:
    room = make_room(store, tmp_path)
    envelope, _ = build_envelope(room, prompt="once")
    sealed = seal_run_envelope(runner.keys.hpke_public_keys, envelope)
    first = post_run(store, envelope, sealed, payer_tenant_id=room.owner.tenant_id)
    replay = post_run(store, envelope, sealed, payer_tenant_id=room.owner.tenant_id)
    runner.lifecycle.execute(first.run_id, receive_count=1)
    assert store.runs.require(first.run_id).status is RunStatus.COMPLETED
    settlements(store)
    runner.lifecycle.execute(replay.run_id, receive_count=1)
    assert_failed(store, runner, replay.run_id, "replay_detected")
    assert len(pipeline.seen) == 1


def test_expired_envelope_is_refused(store: Store, tmp_path: Path, runner: HarnessRunner) -> None:
    room = make_room(store, tmp_path)
    envelope, _ = build_envelope(room, prompt="late", ttl_s=60, now=int(time.time()) - 120)
    run = post_run(
        store, envelope, seal_run_envelope(runner.keys.hpke_public_keys, envelope), payer_tenant_id="tenant_x"
    )
    runner.lifecycle.execute(run.run_id, receive_count=1)
    assert_failed(store, runner, run.run_id, "expired")


def test_envelope_sealed_to_another_runner_or_room_is_refused(
    store: Store, tmp_path: Path, pipeline: FakePipeline, runner: HarnessRunner
) -> None:
    room = make_room(store, tmp_path)
    stranger = make_runner(store, tmp_path / "stranger", pipeline)
    submitted = submit_run(store, room, runner_keys=stranger.keys.hpke_public_keys)
    runner.lifecycle.execute(submitted.run_id, receive_count=1)
    assert_failed(store, runner, submitted.run_id, "envelope_invalid")


def test_run_row_that_disagrees_with_the_envelope_is_refused(
    store: Store, tmp_path: Path, runner: HarnessRunner
) -> None:
    room = make_room(store, tmp_path)
    invite, bearer_id = add_invite(store, room)
    envelope, _ = build_envelope(room, prompt="mine", bearer_secret=invite, bearer_id=bearer_id)
    sealed = seal_run_envelope(runner.keys.hpke_public_keys, envelope)
    # The control plane records the run under another caller than the envelope's bearer.
    record = post_run(store, envelope, sealed, payer_tenant_id=room.owner.tenant_id, enqueue=False)
    forged = record.model_copy(update={"caller_id": room.owner.tenant_id, "run_id": "run_forgedcaller"})
    store.runs.create(forged)
    runner.lifecycle.execute(forged.run_id, receive_count=1)
    assert_failed(store, runner, forged.run_id, "envelope_invalid")


def test_tampered_room_manifest_is_refused(store: Store, tmp_path: Path, runner: HarnessRunner) -> None:
    room = make_room(store, tmp_path)
    submitted = submit_run(store, room, runner_keys=runner.keys.hpke_public_keys)
    stored = store.rooms.get(room.room_id)
    assert stored is not None and stored.envelope is not None
    tampered = json.loads(json.dumps(stored.envelope))
    tampered["manifest"]["egress"]["artifacts"] = True  # the control plane widens the room's egress
    store.clients.dynamodb.update_item(
        TableName=store.config.table_name(TableRole.ROOMS),
        Key={"room_id": {"S": room.room_id}, "sk": {"S": "manifest"}},
        UpdateExpression="SET envelope = :envelope",
        ExpressionAttributeValues={":envelope": TypeSerializer().serialize(tampered)},
    )
    runner.lifecycle.execute(submitted.run_id, receive_count=1)
    assert_failed(store, runner, submitted.run_id, "manifest_invalid")


def test_manifest_substituted_by_another_key_is_refused(
    store: Store, tmp_path: Path, runner: HarnessRunner
) -> None:
    room = make_room(store, tmp_path)
    submitted = submit_run(store, room, runner_keys=runner.keys.hpke_public_keys)
    impostor = Tenant.create(None)
    forged_manifest = room.manifest.model_copy(
        update={"owner_sign_pub": impostor.sign_pub, "owner_box_pub": impostor.box_pub}
    )
    forged = sign_manifest(forged_manifest, impostor.sign_key)
    store.rooms.update_manifest(
        room.room_id,
        envelope=forged.model_dump(mode="json"),
        manifest_hash=forged.manifest_hash,
        revision=forged_manifest.revision + 1,
    )
    runner.lifecycle.execute(submitted.run_id, receive_count=1)
    assert_failed(store, runner, submitted.run_id, "signature_invalid")


def test_manifest_changed_since_the_client_accepted_it_is_refused(
    store: Store, tmp_path: Path, runner: HarnessRunner
) -> None:
    room = make_room(store, tmp_path)
    submitted = submit_run(store, room, runner_keys=runner.keys.hpke_public_keys)
    newer = room.manifest.model_copy(update={"revision": 2, "name": "Renamed"})
    signed = sign_manifest(newer, room.owner.sign_key)
    store.rooms.update_manifest(
        room.room_id, envelope=signed.model_dump(mode="json"), manifest_hash=signed.manifest_hash, revision=2
    )
    runner.lifecycle.execute(submitted.run_id, receive_count=1)
    assert_failed(store, runner, submitted.run_id, "manifest_mismatch")


def repoint_item(store: Store, room: Room, item_id: str, blob: bytes) -> None:
    """What an attacker with the bucket and the tables can do: store other bytes and repoint the item."""
    stored = store.blobs.put_bytes(item_key(room.room_id, item_id), blob)
    store.clients.dynamodb.update_item(
        TableName=store.config.table_name(TableRole.ROOMS),
        Key={"room_id": {"S": room.room_id}, "sk": {"S": f"item#{item_id}"}},
        UpdateExpression="SET version_id = :version, sha256 = :sha, #size = :size",
        ExpressionAttributeNames={"#size": "size"},
        ExpressionAttributeValues={
            ":version": {"S": stored.version_id or ""},
            ":sha": {"S": stored.sha256},
            ":size": {"N": str(stored.size)},
        },
    )


@pytest.mark.parametrize("attack", ["flip", "other_room"])
def test_tampered_or_moved_item_is_refused(
    store: Store, tmp_path: Path, pipeline: FakePipeline, runner: HarnessRunner, attack: str
) -> None:
    room = make_room(store, tmp_path)
    original = store.blobs.get_bytes(item_key(room.room_id, "item_sales"))
    if attack == "flip":
        blob = bytearray(original)
        blob[40] ^= 1
        replacement = bytes(blob)
    else:
        # The same item id sealed for another room of the same owner (another DEK and context).
        other = create_room(
            store, room.owner, room.manifest.model_copy(update={"room_id": "room_othersource"})
        )
        replacement = store.blobs.get_bytes(
            item_key(other.room_id, seal_item(store, other, b"x,y\n", item_id="item_sales").item_id)
        )
    repoint_item(store, room, "item_sales", replacement)
    submitted = submit_run(store, room, runner_keys=runner.keys.hpke_public_keys)
    runner.lifecycle.execute(submitted.run_id, receive_count=1)
    assert_failed(store, runner, submitted.run_id, "seal_tag_mismatch")
    assert pipeline.seen == []


def test_agent_source_that_does_not_match_the_pinned_digest_is_refused(
    store: Store, tmp_path: Path, pipeline: FakePipeline, runner: HarnessRunner
) -> None:
    owner = Tenant.create(store, "owner")
    scope = upload_agent(store, owner, write_agent_dir(tmp_path / "scope"))
    honest = write_agent_dir(tmp_path / "query", body="# honest\n")
    swapped = pack_directory(write_agent_dir(tmp_path / "evil", body="# exfiltrate\n"))
    query = upload_agent(store, owner, honest, archive=swapped)  # declared digest: honest's
    manifest = build_manifest(
        owner,
        room_id="room_swapped",
        scope=agent_ref(scope),
        query=agent_ref(query),
        compose_hashes=[TEST_COMPOSE_HASH],
    )
    room = create_room(store, owner, manifest)
    submitted = submit_run(store, room, runner_keys=runner.keys.hpke_public_keys)
    runner.lifecycle.execute(submitted.run_id, receive_count=1)
    assert_failed(store, runner, submitted.run_id, "source_digest_mismatch")
    assert pipeline.seen == []


def test_pipeline_failure_is_a_failed_run_with_its_code_and_usage(
    store: Store, tmp_path: Path, pipeline: FakePipeline, runner: HarnessRunner
) -> None:
    pipeline.error_code = "output_denied"
    room = make_room(store, tmp_path)
    submitted = submit_run(store, room, runner_keys=runner.keys.hpke_public_keys)
    runner.lifecycle.execute(submitted.run_id, receive_count=1)
    signed = assert_failed(store, runner, submitted.run_id, "output_denied")
    assert len(signed.receipt.agents) == 3 and signed.receipt.totals.llm_calls == 3


def test_pipeline_crash_fails_the_run_without_leaking_its_message(
    store: Store, tmp_path: Path, pipeline: FakePipeline, runner: HarnessRunner
) -> None:
    def crash(inputs: Any) -> None:
        raise RuntimeError("secret row: alice,salary=999999")

    pipeline.during = crash
    room = make_room(store, tmp_path)
    submitted = submit_run(store, room, runner_keys=runner.keys.hpke_public_keys)
    runner.lifecycle.execute(submitted.run_id, receive_count=1)
    assert_failed(store, runner, submitted.run_id, "internal_error")
    assert store.runs.require(submitted.run_id).error_message is None


# --- redelivery, takeover, giving up -----------------------------------------------------------------


def test_redelivered_message_after_completion_changes_nothing(
    store: Store, tmp_path: Path, pipeline: FakePipeline, runner: HarnessRunner
) -> None:
    room = make_room(store, tmp_path)
    submitted = submit_run(store, room, runner_keys=runner.keys.hpke_public_keys)
    runner.lifecycle.execute(submitted.run_id, receive_count=1)
    before = store.runs.require(submitted.run_id)
    receipt_before = read_receipt(store, submitted.run_id)
    settlements(store)

    assert runner.lifecycle.execute(submitted.run_id, receive_count=2) is RunOutcome.FINISHED

    assert len(pipeline.seen) == 1
    assert receipt_versions(store, submitted.run_id) == 1
    assert read_receipt(store, submitted.run_id) == receipt_before
    after = store.runs.require(submitted.run_id)
    assert (after.status, after.finished_at, after.receipt_key) == (
        before.status,
        before.finished_at,
        before.receipt_key,
    )
    # Only the (idempotent) settlement is sent again, in case the first was lost in a crash.
    assert [message["run_id"] for message in settlements(store)] == [submitted.run_id]


def test_takeover_during_the_pipeline_stops_the_old_attempt_without_writing(
    store: Store, tmp_path: Path, pipeline: FakePipeline, runner: HarnessRunner
) -> None:
    room = make_room(store, tmp_path)
    submitted = submit_run(store, room, runner_keys=runner.keys.hpke_public_keys)

    def taken_over(inputs: Any) -> None:
        store.runs.start(inputs.run_id, "runner_other")

    pipeline.during = taken_over
    assert runner.lifecycle.execute(submitted.run_id, receive_count=1) is RunOutcome.LOST
    run = store.runs.require(submitted.run_id)
    assert (run.status, run.runner_id, run.attempts) == (RunStatus.RUNNING, "runner_other", 2)
    assert run.receipt_key is None and receipt_versions(store, submitted.run_id) == 0
    assert settlements(store) == []
    assert workspace_leftovers(runner) == []


def test_resumed_run_may_open_its_own_envelope_again(
    store: Store, tmp_path: Path, pipeline: FakePipeline, runner: HarnessRunner
) -> None:
    room = make_room(store, tmp_path)
    submitted = submit_run(store, room, runner_keys=runner.keys.hpke_public_keys)
    # A previous attempt started the run and spent the nonce, then its runner died.
    store.runs.start(submitted.run_id, runner.runner_id)
    store.nonces.guard_for_run(submitted.run_id).check_and_record(
        submitted.envelope.nonce, submitted.envelope.expires_at
    )
    runner.lifecycle.execute(submitted.run_id, receive_count=2)
    run = store.runs.require(submitted.run_id)
    assert run.status is RunStatus.COMPLETED and run.attempts == 2


def test_message_received_too_often_gives_up_and_releases_the_hold(
    store: Store, tmp_path: Path, pipeline: FakePipeline, runner: HarnessRunner
) -> None:
    room = make_room(store, tmp_path)
    submitted = submit_run(store, room, runner_keys=runner.keys.hpke_public_keys)
    assert runner.lifecycle.execute(submitted.run_id, receive_count=4) is RunOutcome.FINISHED
    assert_failed(store, runner, submitted.run_id, "runner_gave_up")
    assert pipeline.seen == []


def test_unknown_run_is_reported_as_such(runner: HarnessRunner) -> None:
    assert runner.lifecycle.execute("run_doesnotexist", receive_count=1) is RunOutcome.UNKNOWN_RUN
