"""Runs through the API: submission (hold, envelope, run row, queue message), idempotent retries, the
visibility matrix, long-polling and outputs. Every test runs through Mangum (API Gateway v2 events) and
over HTTP (uvicorn)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from hivemind.encoding import b64decode, b64encode
from hivemind.envelope import (
    HpkeSuite,
    OutputRecipient,
    RunEnvelope,
    SealedEnvelope,
    open_output_key,
    seal_output_key,
    seal_run_envelope,
)
from hivemind.errors import ServiceUnavailable
from hivemind.keys import owner_box_key, public_bytes, wrap_key
from hivemind.ledger import LedgerKind
from hivemind.models import Budgets, ObjectKind, OutputVisibility, RunStatus, Stage
from hivemind.receipt import OutputDigests, Receipt, UsageTotals, sign_receipt
from hivemind.seal import SealContext, open_bytes, seal_bytes
from hivemind.store import Store
from hivemind.store.runs import RunResult
from hivemind.store.schema import QueueRole, run_artifact_key, run_output_key, run_receipt_key

RUNNER_FEE = 10  # micro-USD per second
HAS_SEALED_KEYS = "sealed_output_keys" in RunResult.model_fields
needs_sealed_keys = pytest.mark.skipif(
    not HAS_SEALED_KEYS, reason="hivemind.store.runs.RunResult has no sealed_output_keys yet"
)


# --- helpers ----------------------------------------------------------------------------------------


def price(store: Store, fee: int = RUNNER_FEE) -> None:
    store.prices.set_runner_fee(fee, updated_by="test")


def default_hold(room: Any) -> int:
    return RUNNER_FEE * room.manifest.budgets.defaults.timeout_s


class Asker:
    """Builds run requests the way hmctl does: a real run envelope sealed to the runner."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.reply_keys: dict[str, X25519PrivateKey] = {}

    def body(
        self,
        room: Any,
        bearer: Any,
        runner: Any,
        *,
        prompt: str = "how many rows?",
        budgets: dict[str, int] | None = None,
        key: str | None = None,
        query_agent_id: str | None = None,
    ) -> dict[str, Any]:
        reply = X25519PrivateKey.generate()
        requested = Budgets(**budgets) if budgets else room.manifest.budgets.defaults
        envelope = RunEnvelope.create(
            room_id=room.room_id,
            manifest_hash=room.manifest_hash,
            bearer_id=bearer.bearer_id,
            wrap_key=wrap_key(bearer.secret, room.room_id),
            prompt=prompt,
            reply_pub=public_bytes(reply),
            budgets=requested,
            now=self.store.clock(),
            query_agent_id=query_agent_id,
        )
        sealed = seal_run_envelope(runner.public_keys, envelope, suite=HpkeSuite.X25519)
        idempotency_key = key or uuid.uuid4().hex
        self.reply_keys[idempotency_key] = reply
        body: dict[str, Any] = {
            "envelope": sealed.model_dump(mode="json"),
            "runner_id": runner.runner_id,
            "prompt_sha256": envelope.prompt_sha256(),
            "idempotency_key": idempotency_key,
        }
        if budgets is not None:
            body["budgets"] = budgets
        if query_agent_id is not None:
            body["query_agent_id"] = query_agent_id
        return body


def queued_run_ids(store: Store) -> list[str]:
    clients = store.clients
    url = clients.queue_url(QueueRole.RUNS)
    found: list[str] = []
    for _ in range(5):
        messages = clients.sqs.receive_message(
            QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0, VisibilityTimeout=30
        ).get("Messages", [])
        if not messages:
            break
        found += [json.loads(message["Body"])["run_id"] for message in messages]
    return found


def finish_completed(
    store: Store,
    room: Any,
    runner: Any,
    run_id: str,
    reply_pub: bytes,
    *,
    artifacts: dict[str, bytes] | None = None,
) -> bytes:
    """Play the runner: take the run, store a sealed output, a signed receipt and the sealed output keys
    (to the querier, and to the owner when the room shows outputs to it). Returns the output key."""
    run = store.runs.start(run_id, runner.runner_id)
    output_key = os.urandom(32)
    plaintext = b"42 rows"
    sealed = seal_bytes(plaintext, key=output_key, context=output_context(room, run_id))
    stored = store.blobs.put_bytes(run_output_key(run_id), sealed)
    for name, data in (artifacts or {}).items():
        store.blobs.put_bytes(run_artifact_key(run_id, name), data)
    now = store.clock()
    receipt = Receipt(
        run_id=run_id,
        status=RunStatus.COMPLETED,
        room_id=room.room_id,
        manifest_hash=run.manifest_hash,
        compose_hash=runner.compose_hash,
        quote_hash="0" * 64,
        agents=[],
        scope_policy_hash="1" * 64,
        prompt_sha256=run.prompt_sha256,
        output=OutputDigests(
            ciphertext_sha256=stored.sha256, plaintext_sha256=hashlib.sha256(plaintext).hexdigest()
        ),
        artifacts=[],
        error_code=None,
        usage=[],
        totals=UsageTotals.of([]),
        started_at=now,
        finished_at=now,
        signer_pub=b64encode(public_bytes(runner.sign_key)),
    )
    store.blobs.put_bytes(run_receipt_key(run_id), sign_receipt(receipt, runner.sign_key).to_json().encode())
    sealed_keys = {
        "querier": seal_output_key(output_key, reply_pub, run_id=run_id, recipient=OutputRecipient.QUERIER)
    }
    if room.manifest.output.visibility is OutputVisibility.OWNER_AND_QUERIER:
        sealed_keys["owner"] = seal_output_key(
            output_key, b64decode(room.manifest.owner_box_pub), run_id=run_id, recipient=OutputRecipient.OWNER
        )
    fields: dict[str, Any] = {
        "receipt_key": run_receipt_key(run_id),
        "output_key": run_output_key(run_id),
        "artifact_names": sorted(artifacts or {}),
    }
    if HAS_SEALED_KEYS:
        fields["sealed_output_keys"] = sealed_keys
    store.runs.finish(run_id, RunStatus.COMPLETED, RunResult(**fields))
    return output_key


def output_context(room: Any, run_id: str) -> SealContext:
    return SealContext(
        tenant_id=room.owner.tenant_id, room_id=room.room_id, kind=ObjectKind.OUTPUT, object_id=run_id
    )


@pytest.fixture
def asker(store: Store) -> Asker:
    price(store)
    return Asker(store)


# --- submission -------------------------------------------------------------------------------------


def test_owner_submits_a_run_hold_envelope_row_and_message(api, hm, store: Store, asker: Asker) -> None:
    alice = hm.tenant("alice")
    store.billing.grant(alice.tenant_id, 1_000_000)
    room = hm.room(alice)
    runner = hm.runner()
    body = asker.body(room, alice, runner)

    submitted = api.post(f"/v1/rooms/{room.room_id}/runs", token=alice.token, json=body).ok(201)

    run_id = submitted["run_id"]
    assert submitted["status"] == "pending"
    assert submitted["payer_tenant_id"] == alice.tenant_id
    assert submitted["hold"] == default_hold(room)
    assert submitted["budgets"] == room.manifest.budgets.defaults.model_dump()
    run = store.runs.require(run_id)
    assert (run.status, run.caller_id, run.manifest_hash) == (
        RunStatus.PENDING,
        alice.tenant_id,
        room.manifest_hash,
    )
    assert json.loads(store.blobs.get_bytes(run.envelope_key)) == body["envelope"]
    account = store.billing.account(alice.tenant_id)
    assert (account.balance, account.held) == (1_000_000, default_hold(room))
    assert queued_run_ids(store) == [run_id]


def test_an_invite_run_is_paid_by_the_owner_and_spends_one_use(api, hm, store: Store, asker: Asker) -> None:
    alice = hm.tenant("alice")
    store.billing.grant(alice.tenant_id, 1_000_000)
    room = hm.room(alice)
    bob = hm.invite(room, uses=2)
    runner = hm.runner()

    submitted = api.post(
        f"/v1/rooms/{room.room_id}/runs", token=bob.token, json=asker.body(room, bob, runner)
    ).ok(201)

    assert submitted["payer_tenant_id"] == alice.tenant_id
    assert store.runs.require(submitted["run_id"]).caller_id == bob.invite_id
    assert store.credentials.get(bob.auth_hash).uses == 1
    assert store.billing.account(alice.tenant_id).held == default_hold(room)


def test_the_payer_header_makes_that_tenant_pay(api, hm, store: Store, asker: Asker) -> None:
    alice, carol = hm.tenant("alice"), hm.tenant("carol")
    store.billing.grant(carol.tenant_id, 1_000_000)
    room = hm.room(alice)
    bob = hm.invite(room)
    runner = hm.runner()

    submitted = api.post(
        f"/v1/rooms/{room.room_id}/runs",
        token=bob.token,
        json=asker.body(room, bob, runner),
        headers={"X-Hivemind-Payer": carol.token},
    ).ok(201)

    assert submitted["payer_tenant_id"] == carol.tenant_id
    assert store.billing.account(carol.tenant_id).held == default_hold(room)
    assert store.billing.account(alice.tenant_id).held == 0
    bad = api.post(
        f"/v1/rooms/{room.room_id}/runs",
        token=bob.token,
        json=asker.body(room, bob, runner),
        headers={"X-Hivemind-Payer": bob.token},
    )
    assert (bad.status, bad.error) == (401, "payer_invalid")


def test_an_unknown_runner_is_refused_before_anything_is_written(api, hm, store: Store, asker: Asker) -> None:
    alice = hm.tenant("alice")
    store.billing.grant(alice.tenant_id, 1_000_000)
    room = hm.room(alice)
    body = asker.body(room, alice, hm.runner())
    body["runner_id"] = "runner_doesnotexist"

    response = api.post(f"/v1/rooms/{room.room_id}/runs", token=alice.token, json=body)

    assert (response.status, response.error) == (404, "runner_unknown")
    assert store.billing.account(alice.tenant_id).held == 0
    assert queued_run_ids(store) == []


# --- idempotency ------------------------------------------------------------------------------------


def _hold_entries(store: Store, tenant_id: str) -> list[Any]:
    return [entry for entry in store.billing.entries(tenant_id) if entry.kind is LedgerKind.USAGE_HOLD]


def test_a_retried_submission_returns_the_same_run_and_holds_once(
    api, hm, store: Store, asker: Asker
) -> None:
    alice = hm.tenant("alice")
    store.billing.grant(alice.tenant_id, 1_000_000)
    room = hm.room(alice)
    body = asker.body(room, alice, hm.runner())

    first = api.post(f"/v1/rooms/{room.room_id}/runs", token=alice.token, json=body).ok(201)
    second = api.post(f"/v1/rooms/{room.room_id}/runs", token=alice.token, json=body).ok(201)

    assert second == first
    assert len(_hold_entries(store, alice.tenant_id)) == 1
    assert store.billing.account(alice.tenant_id).held == default_hold(room)
    assert queued_run_ids(store) == [first["run_id"]]
    assert [run.run_id for run in store.runs.list_by_caller(alice.tenant_id).items] == [first["run_id"]]


def test_the_same_key_for_another_request_is_refused(api, hm, store: Store, asker: Asker) -> None:
    alice = hm.tenant("alice")
    store.billing.grant(alice.tenant_id, 1_000_000)
    room = hm.room(alice)
    runner = hm.runner()
    api.post(
        f"/v1/rooms/{room.room_id}/runs",
        token=alice.token,
        json=asker.body(room, alice, runner, key="k" * 16),
    ).ok(201)

    other = asker.body(room, alice, runner, key="k" * 16, prompt="a different question")
    response = api.post(f"/v1/rooms/{room.room_id}/runs", token=alice.token, json=other)

    assert (response.status, response.error) == (409, "idempotency_key_reused")
    assert len(_hold_entries(store, alice.tenant_id)) == 1


def test_the_same_key_from_another_caller_is_another_run(api, hm, store: Store, asker: Asker) -> None:
    alice = hm.tenant("alice")
    store.billing.grant(alice.tenant_id, 1_000_000)
    room = hm.room(alice)
    bob = hm.invite(room)
    runner = hm.runner()

    mine = api.post(
        f"/v1/rooms/{room.room_id}/runs",
        token=alice.token,
        json=asker.body(room, alice, runner, key="shared-key"),
    ).ok(201)
    theirs = api.post(
        f"/v1/rooms/{room.room_id}/runs",
        token=bob.token,
        json=asker.body(room, bob, runner, key="shared-key"),
    ).ok(201)

    assert mine["run_id"] != theirs["run_id"]
    assert store.runs.require(theirs["run_id"]).caller_id == bob.invite_id


def test_a_submission_interrupted_after_its_hold_is_completed_by_the_retry(
    api, hm, store: Store, asker: Asker, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = hm.tenant("alice")
    store.billing.grant(alice.tenant_id, 1_000_000)
    room = hm.room(alice)
    bob = hm.invite(room, uses=5)
    body = asker.body(room, bob, hm.runner())
    real_put = store.blobs.put_bytes
    calls = {"n": 0}

    def put_failing_once(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ServiceUnavailable("storage is busy; retry")
        return real_put(*args, **kwargs)

    monkeypatch.setattr(store.blobs, "put_bytes", put_failing_once)

    failed = api.post(f"/v1/rooms/{room.room_id}/runs", token=bob.token, json=body)
    assert (failed.status, failed.error) == (503, "service_unavailable")
    assert store.billing.account(alice.tenant_id).held == default_hold(room)  # the hold was taken

    retried = api.post(f"/v1/rooms/{room.room_id}/runs", token=bob.token, json=body).ok(201)

    assert store.runs.require(retried["run_id"]).status is RunStatus.PENDING
    assert len(_hold_entries(store, alice.tenant_id)) == 1
    assert store.billing.account(alice.tenant_id).held == default_hold(room)
    assert store.credentials.get(bob.auth_hash).uses == 1
    assert queued_run_ids(store) == [retried["run_id"]]


# --- visibility -------------------------------------------------------------------------------------


@pytest.fixture
def shared_run(hm, store: Store, api, asker: Asker) -> dict[str, Any]:
    """A room of alice with two invites (bob ran, dave did not), another tenant and an admin."""
    alice, eve = hm.tenant("alice"), hm.tenant("eve")
    store.billing.grant(alice.tenant_id, 1_000_000)
    room = hm.room(alice)
    bob, dave = hm.invite(room), hm.invite(room)
    runner = hm.runner()
    body = asker.body(room, bob, runner)
    run_id = api.post(f"/v1/rooms/{room.room_id}/runs", token=bob.token, json=body).ok(201)["run_id"]
    return {
        "room": room,
        "run_id": run_id,
        "runner": runner,
        "owner": alice,
        "querier": bob,
        "other_invite": dave,
        "other_tenant": eve,
        "admin": hm.admin(),
        "reply": asker.reply_keys[body["idempotency_key"]],
    }


def test_run_metadata_visibility_matrix(api, shared_run: dict[str, Any]) -> None:
    run_id, room = shared_run["run_id"], shared_run["room"]
    seen = {
        who: api.get(f"/v1/runs/{run_id}", token=shared_run[who].token)
        for who in ("owner", "querier", "other_invite", "other_tenant", "admin")
    }

    assert seen["querier"].ok()["prompt_sha256"] is not None
    assert seen["owner"].ok()["prompt_sha256"] is None  # metadata only: not even the prompt's hash
    assert seen["admin"].ok()["run_id"] == run_id
    for who in ("other_invite", "other_tenant"):
        assert (seen[who].status, seen[who].error) == (404, "run_not_found")
    assert seen["querier"].json()["output_visible"] is True
    assert seen["owner"].json()["output_visible"] is False  # the room is querier_only

    def listed(who: str, **params: Any) -> Any:
        return api.get("/v1/runs", token=shared_run[who].token, params=params)

    assert [run["run_id"] for run in listed("querier").ok()["runs"]] == [run_id]
    assert listed("other_invite").ok()["runs"] == []
    assert listed("owner").ok()["runs"] == []  # the owner's own runs
    assert [run["run_id"] for run in listed("owner", room_id=room.room_id).ok()["runs"]] == [run_id]
    assert [run["run_id"] for run in listed("admin", room_id=room.room_id).ok()["runs"]] == [run_id]
    assert listed("other_tenant", room_id=room.room_id).status == 404
    assert listed("admin").error == "invalid_input"


def test_an_unknown_run_is_not_found(api, hm) -> None:
    alice = hm.tenant("alice")
    response = api.get("/v1/runs/run_doesnotexist", token=alice.token)
    assert (response.status, response.error) == (404, "run_not_found")


# --- long polling -----------------------------------------------------------------------------------


def test_long_poll_returns_as_soon_as_the_run_changes(api, shared_run: dict[str, Any], store: Store) -> None:
    run_id, runner = shared_run["run_id"], shared_run["runner"]

    def start_later() -> None:
        time.sleep(0.6)
        store.runs.start(run_id, runner.runner_id)

    thread = threading.Thread(target=start_later)
    thread.start()
    started = time.monotonic()
    view = api.get(f"/v1/runs/{run_id}", token=shared_run["querier"].token, params={"wait": 10}).ok()
    elapsed = time.monotonic() - started
    thread.join()

    assert view["status"] == "running"
    assert 0.5 < elapsed < 5

    def stage_later() -> None:
        time.sleep(0.3)
        store.runs.set_stage(run_id, runner.runner_id, Stage.QUERY)

    thread = threading.Thread(target=stage_later)
    thread.start()
    view = api.get(f"/v1/runs/{run_id}", token=shared_run["querier"].token, params={"wait": 10}).ok()
    thread.join()
    assert (view["status"], view["stage"]) == ("running", "query")


def test_long_poll_without_change_waits_and_a_finished_run_answers_at_once(
    api, shared_run: dict[str, Any], store: Store
) -> None:
    run_id = shared_run["run_id"]
    started = time.monotonic()
    view = api.get(f"/v1/runs/{run_id}", token=shared_run["querier"].token, params={"wait": 1}).ok()
    assert view["status"] == "pending"
    assert time.monotonic() - started >= 0.9

    store.runs.finish(run_id, RunStatus.FAILED, RunResult(error_code="scope_failed"))
    started = time.monotonic()
    view = api.get(f"/v1/runs/{run_id}", token=shared_run["querier"].token, params={"wait": 20}).ok()
    assert view["status"] == "failed"
    assert time.monotonic() - started < 1


# --- outputs ----------------------------------------------------------------------------------------


def test_output_of_an_unfinished_run_is_refused(api, shared_run: dict[str, Any]) -> None:
    response = api.get(f"/v1/runs/{shared_run['run_id']}/output", token=shared_run["querier"].token)
    assert (response.status, response.error) == (409, "run_not_finished")


@needs_sealed_keys
def test_output_visibility_in_a_querier_only_room(api, shared_run: dict[str, Any], store: Store, hm) -> None:
    run_id, room = shared_run["run_id"], shared_run["room"]
    reply: X25519PrivateKey = shared_run["reply"]
    output_key = finish_completed(store, room, shared_run["runner"], run_id, public_bytes(reply))

    answer = api.get(f"/v1/runs/{run_id}/output", token=shared_run["querier"].token).ok()

    assert answer["recipient"] == "querier"
    assert answer["receipt"]["receipt"]["run_id"] == run_id
    sealed_key = SealedEnvelope.model_validate(answer["sealed_output_key"])
    opened = open_output_key(reply, sealed_key, run_id=run_id, recipient=OutputRecipient.QUERIER)
    assert opened == output_key
    downloaded = hm._http.get(answer["output_url"])
    assert downloaded.status_code == 200
    assert open_bytes(downloaded.content, key=opened, context=output_context(room, run_id)) == b"42 rows"
    for who, code in (
        ("owner", "output_not_visible"),
        ("admin", "output_not_visible"),
        ("other_invite", "run_not_found"),
        ("other_tenant", "run_not_found"),
    ):
        response = api.get(f"/v1/runs/{run_id}/output", token=shared_run[who].token)
        assert (response.status, response.error) == (404, code), who


@needs_sealed_keys
def test_the_owner_gets_the_output_when_the_room_shares_it(api, hm, store: Store, asker: Asker) -> None:
    alice = hm.tenant("alice")
    store.billing.grant(alice.tenant_id, 1_000_000)
    room = hm.room(alice, output="owner_and_querier", artifacts=True)
    bob, dave = hm.invite(room), hm.invite(room)
    runner = hm.runner()
    body = asker.body(room, bob, runner)
    run_id = api.post(f"/v1/rooms/{room.room_id}/runs", token=bob.token, json=body).ok(201)["run_id"]
    reply = asker.reply_keys[body["idempotency_key"]]
    output_key = finish_completed(
        store, room, runner, run_id, public_bytes(reply), artifacts={"chart.png": b"x"}
    )

    owner_view = api.get(f"/v1/runs/{run_id}", token=alice.token).ok()
    answer = api.get(f"/v1/runs/{run_id}/output", token=alice.token).ok()

    assert owner_view["output_visible"] is True
    assert answer["recipient"] == "owner"
    sealed_key = SealedEnvelope.model_validate(answer["sealed_output_key"])
    assert open_output_key(
        owner_box_key(alice.secret), sealed_key, run_id=run_id, recipient=OutputRecipient.OWNER
    ) == (output_key)
    assert [artifact["name"] for artifact in answer["artifacts"]] == ["chart.png"]
    link = api.get(f"/v1/runs/{run_id}/artifacts/chart.png", token=bob.token).ok()
    assert hm._http.get(link["url"]).content == b"x"
    missing = api.get(f"/v1/runs/{run_id}/artifacts/other.png", token=bob.token)
    assert (missing.status, missing.error) == (404, "artifact_not_found")
    hidden = api.get(f"/v1/runs/{run_id}/artifacts/chart.png", token=dave.token)
    assert (hidden.status, hidden.error) == (404, "run_not_found")


@pytest.mark.parametrize("api", ["http"], indirect=True)  # two requests at once need a real server
def test_a_duplicate_sent_while_the_first_is_in_flight_is_told_to_retry(
    http_api, hm, store: Store, asker: Asker, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = hm.tenant("alice")
    store.billing.grant(alice.tenant_id, 1_000_000)
    room = hm.room(alice)
    body = asker.body(room, alice, hm.runner())
    entered, release = threading.Event(), threading.Event()
    real_put = store.blobs.put_bytes

    def slow_put(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        release.wait(10)
        return real_put(*args, **kwargs)

    monkeypatch.setattr(store.blobs, "put_bytes", slow_put)
    first: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: first.update(
            response=http_api.post(f"/v1/rooms/{room.room_id}/runs", token=alice.token, json=body)
        )
    )
    thread.start()
    assert entered.wait(10)

    duplicate = http_api.post(f"/v1/rooms/{room.room_id}/runs", token=alice.token, json=body)
    release.set()
    thread.join()

    assert (duplicate.status, duplicate.error) == (409, "request_in_progress")
    created = first["response"].ok(201)
    retried = http_api.post(f"/v1/rooms/{room.room_id}/runs", token=alice.token, json=body).ok(201)
    assert retried == created
    assert len(_hold_entries(store, alice.tenant_id)) == 1
    assert queued_run_ids(store) == [created["run_id"]]
