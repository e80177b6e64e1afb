"""The run admission chain (DESIGN §10) through ``POST /v1/rooms/{id}/runs``: each head policy's denial
with its code and status, budgets clamped to the room's maxima and the invite's caps, operator-appended
policies (an exploding one is ``policy_error``, a bad configuration ``policy_chain_unavailable``), and
that a denied request writes nothing (no hold, no run, no queue message)."""

from __future__ import annotations

import json
import uuid
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from hivemind.admission import Deny
from hivemind.envelope import HpkeSuite, RunEnvelope, seal_run_envelope
from hivemind.keys import public_bytes, wrap_key
from hivemind.manifest import AgentRef, QueryRule
from hivemind.models import BudgetLimits, Budgets, QueryMode, Visibility
from hivemind.store import Store
from hivemind.store.base import Table
from hivemind.store.credentials import CredentialKind, CredentialRecord
from hivemind.store.rooms import RoomRecord
from hivemind.store.schema import QueueRole, TableRole
from hivemind.store.tenants import TenantStatus
from hivemind.tokens import random_id
from hivemind_functions import admission
from hivemind_functions.admission import CredentialValid, RunAdmission
from hivemind_functions.settings import FunctionSettings

RUNNER_FEE = 10
PROVIDER_PRICE = 2_000_000  # micro-USD per million tokens (prompt and completion)


@pytest.fixture
def api(lambda_api: Any) -> Any:
    # Policy behaviour does not depend on the transport (test_runs.py covers both); one keeps this fast.
    return lambda_api


@pytest.fixture
def function_settings(store: Store, request: pytest.FixtureRequest) -> FunctionSettings:
    overrides: dict[str, Any] = getattr(request, "param", {})
    return FunctionSettings(store=store.config, self_serve_signup=True, **overrides)


def settings(**overrides: Any) -> Any:
    return pytest.mark.parametrize("function_settings", [overrides], indirect=True)


@pytest.fixture
def world(hm, store: Store) -> dict[str, Any]:
    store.prices.set_runner_fee(RUNNER_FEE, updated_by="test")
    alice = hm.tenant("alice")
    store.billing.grant(alice.tenant_id, 10_000_000)
    return {"alice": alice, "runner": hm.runner()}


def body_for(
    store: Store,
    room: Any,
    bearer: Any,
    runner: Any,
    *,
    budgets: dict[str, int] | None = None,
    query_agent_id: str | None = None,
    prompt: str = "how many rows?",
) -> dict[str, Any]:
    envelope = RunEnvelope.create(
        room_id=room.room_id,
        manifest_hash=room.manifest_hash,
        bearer_id=bearer.bearer_id,
        wrap_key=wrap_key(bearer.secret, room.room_id),
        prompt=prompt,
        reply_pub=public_bytes(X25519PrivateKey.generate()),
        budgets=Budgets(**budgets) if budgets else room.manifest.budgets.defaults,
        now=store.clock(),
        query_agent_id=query_agent_id,
    )
    body: dict[str, Any] = {
        "envelope": seal_run_envelope(runner.public_keys, envelope, suite=HpkeSuite.X25519).model_dump(
            mode="json"
        ),
        "runner_id": runner.runner_id,
        "prompt_sha256": envelope.prompt_sha256(),
        "idempotency_key": uuid.uuid4().hex,
    }
    if budgets is not None:
        body["budgets"] = budgets
    if query_agent_id is not None:
        body["query_agent_id"] = query_agent_id
    return body


def submit(api: Any, store: Store, room: Any, bearer: Any, runner: Any, **kwargs: Any) -> Any:
    headers = kwargs.pop("headers", None)
    return api.post(
        f"/v1/rooms/{room.room_id}/runs",
        token=bearer.token,
        json=body_for(store, room, bearer, runner, **kwargs),
        headers=headers,
    )


def assert_denied(response: Any, status: int, code: str) -> None:
    assert (response.status, response.error) == (status, code), response.body[:500]


def assert_nothing_written(store: Store, payer_id: str) -> None:
    assert store.billing.account(payer_id).held == 0
    url = store.clients.queue_url(QueueRole.RUNS)
    assert store.clients.sqs.receive_message(QueueUrl=url, WaitTimeSeconds=0).get("Messages", []) == []


# --- 1. credential valid ----------------------------------------------------------------------------


def test_an_invite_out_of_uses_is_refused(api, hm, store: Store, world: dict[str, Any]) -> None:
    alice, runner = world["alice"], world["runner"]
    room = hm.room(alice)
    bob = hm.invite(room, uses=1)
    submit(api, store, room, bob, runner).ok(201)

    response = submit(api, store, room, bob, runner)

    assert_denied(response, 403, "credential_exhausted")
    assert (
        store.billing.account(alice.tenant_id).held == RUNNER_FEE * room.manifest.budgets.defaults.timeout_s
    )


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"revoked": True}, "credential_revoked"),
        ({"expires_at": 1}, "credential_expired"),
        ({"kind": CredentialKind.ADMIN, "room_id": None}, "credential_invalid"),
    ],
)
def test_the_credential_policy_refuses_unusable_credentials(changes: dict[str, Any], code: str) -> None:
    # The API's authentication refuses these earlier; the chain refuses them on its own as well.
    base = {
        "auth_hash": "a" * 64,
        "kind": CredentialKind.INVITE,
        "token_id": "a" * 16,
        "tenant_id": "tenant_x",
        "room_id": "room_x",
        "created_at": 0,
    }
    credential = CredentialRecord.model_validate({**base, **changes})
    ctx = RunAdmission(
        credential=credential,
        room_id="room_x",
        envelope_bytes=10,
        requested_budgets=None,
        query_agent_id=None,
    )
    decision = CredentialValid(lambda: 1_000).evaluate(ctx)
    assert isinstance(decision, Deny) and decision.code == code


# --- 2. room active and its manifest verifies --------------------------------------------------------


def test_a_deleted_or_unknown_room_is_refused(api, hm, store: Store, world: dict[str, Any]) -> None:
    alice, runner = world["alice"], world["runner"]
    room = hm.room(alice)
    store.rooms.delete(room.room_id)

    assert_denied(submit(api, store, room, alice, runner), 403, "room_inactive")
    room.room_id = "room_nosuchroom"
    assert_denied(submit(api, store, room, alice, runner), 403, "room_inactive")
    assert_nothing_written(store, alice.tenant_id)


def test_a_tampered_stored_manifest_is_refused(api, hm, store: Store, world: dict[str, Any]) -> None:
    alice, runner = world["alice"], world["runner"]
    room = hm.room(alice)
    Table(store.clients, TableRole.ROOMS).update(
        {"room_id": room.room_id, "sk": "manifest"},
        update="SET envelope.manifest.#name = :name",
        names={"#name": "name"},
        values={":name": "Renamed by the operator"},
    )

    assert_denied(submit(api, store, room, alice, runner), 403, "room_envelope_invalid")
    assert_nothing_written(store, alice.tenant_id)


# --- 3. caller may run this room ---------------------------------------------------------------------


def test_only_the_owner_and_the_rooms_invites_may_run(api, hm, store: Store, world: dict[str, Any]) -> None:
    alice, runner = world["alice"], world["runner"]
    eve = hm.tenant("eve")
    store.billing.grant(eve.tenant_id, 10_000_000)
    room, other_room = hm.room(alice), hm.room(alice)
    invite_elsewhere = hm.invite(other_room)

    assert_denied(submit(api, store, room, eve, runner), 403, "caller_not_allowed")
    # An invite of another room, sending an envelope for this one:
    response = api.post(
        f"/v1/rooms/{room.room_id}/runs",
        token=invite_elsewhere.token,
        json=body_for(store, other_room, invite_elsewhere, runner),
    )
    assert_denied(response, 403, "caller_not_allowed")
    assert_nothing_written(store, alice.tenant_id)
    assert_nothing_written(store, eve.tenant_id)


# --- 4. query mode and agent --------------------------------------------------------------------------


def test_a_fixed_room_runs_only_its_query_agent(api, hm, store: Store, world: dict[str, Any]) -> None:
    alice, runner = world["alice"], world["runner"]
    room = hm.room(alice)
    other = hm.agent(alice, name="other")

    assert_denied(
        submit(api, store, room, alice, runner, query_agent_id=other.agent_id), 403, "query_agent_not_allowed"
    )
    fixed = room.manifest.query.agent_id
    submit(api, store, room, alice, runner, query_agent_id=fixed).ok(201)


def test_an_uploadable_room_needs_an_agent_uploaded_for_it_with_its_visibility(
    api, hm, store: Store, world: dict[str, Any]
) -> None:
    alice, runner = world["alice"], world["runner"]
    room = hm.room(alice, query_mode="uploadable", query_visibility="inspectable")
    elsewhere = hm.room(alice, query_mode="uploadable", query_visibility="inspectable")
    bob = hm.invite(room)
    foreign = hm.agent(alice, room=elsewhere, name="foreign")
    pending = hm.agent(bob, room=room, name="pending", commit=False)
    good = hm.agent(bob, room=room, name="good")

    assert_denied(submit(api, store, room, bob, runner), 403, "query_agent_not_allowed")
    for agent in (foreign, pending):
        response = submit(api, store, room, bob, runner, query_agent_id=agent.agent_id)
        assert_denied(response, 403, "query_agent_not_allowed")
    assert_nothing_written(store, alice.tenant_id)
    submit(api, store, room, bob, runner, query_agent_id=good.agent_id).ok(201)

    # The owner then demands sealed query agents: the inspectable one no longer qualifies.
    hm.trust_update(room, query=QueryRule(mode=QueryMode.UPLOADABLE, visibility=Visibility.SEALED))
    response = submit(api, store, room, bob, runner, query_agent_id=good.agent_id)
    assert_denied(response, 403, "query_agent_not_allowed")


def stored_room(hm: Any, store: Store, owner: Any, **manifest_fields: Any) -> SimpleNamespace:
    """A room written straight to the store, as if created under another deployment configuration."""
    scope = AgentRef(agent_id=random_id("agent"), digest="0" * 64, visibility=Visibility.INSPECTABLE)
    signed = hm.sign(owner, hm.manifest(owner, scope=scope, **manifest_fields))
    now = store.clock()
    store.rooms.create(
        RoomRecord(
            room_id=signed.manifest.room_id,
            tenant_id=owner.tenant_id,
            envelope=signed.model_dump(mode="json"),
            manifest_hash=signed.manifest_hash,
            revision=signed.manifest.revision,
            created_at=now,
            updated_at=now,
        )
    )
    return SimpleNamespace(
        room_id=signed.manifest.room_id, manifest_hash=signed.manifest_hash, manifest=signed.manifest
    )


# --- 5. providers in the deployment's allow-list ----------------------------------------------------


def test_a_room_allowing_a_provider_the_deployment_lacks_is_refused(
    api, hm, store: Store, world: dict[str, Any]
) -> None:
    alice, runner = world["alice"], world["runner"]
    # Rooms are checked against the allow-list when created; this one predates a narrower deployment.
    room = stored_room(hm, store, alice, egress_providers=["openai"])
    assert_denied(submit(api, store, room, alice, runner), 403, "provider_not_allowed")
    assert_nothing_written(store, alice.tenant_id)


@settings(allowed_llm_providers=("openai",))
def test_an_allowed_provider_is_held_at_its_highest_price(
    api, hm, store: Store, world: dict[str, Any]
) -> None:
    alice, runner = world["alice"], world["runner"]
    store.prices.set_price(
        "openai",
        "gpt-x",
        prompt_per_million=PROVIDER_PRICE // 2,
        completion_per_million=PROVIDER_PRICE,
        updated_by="t",
    )
    room = hm.room(alice, egress_providers=["openai"])
    budgets = {"timeout_s": 100, "llm_calls": 5, "tokens": 50_000, "memory_mb": 256}

    submitted = submit(api, store, room, alice, runner, budgets=budgets).ok(201)

    assert submitted["hold"] == 50_000 * PROVIDER_PRICE // 1_000_000 + RUNNER_FEE * 100


# --- 6. budgets clamped ------------------------------------------------------------------------------


def test_budgets_are_clamped_to_the_room_maxima_and_the_invite_caps(
    api, hm, store: Store, world: dict[str, Any]
) -> None:
    alice, runner = world["alice"], world["runner"]
    limits = BudgetLimits(
        defaults=Budgets(timeout_s=60, llm_calls=0, tokens=0, memory_mb=256),
        maxima=Budgets(timeout_s=300, llm_calls=0, tokens=0, memory_mb=512),
    )
    room = hm.room(alice, budgets=limits)
    huge = {"timeout_s": 3600, "llm_calls": 10_000, "tokens": 100_000_000, "memory_mb": 65_536}

    by_owner = submit(api, store, room, alice, runner, budgets=huge).ok(201)
    assert by_owner["budgets"] == limits.maxima.model_dump()
    assert by_owner["hold"] == RUNNER_FEE * 300
    assert store.runs.require(by_owner["run_id"]).budgets == limits.maxima

    capped = hm.invite(room, budgets={"timeout_s": 120, "llm_calls": 0, "tokens": 0, "memory_mb": 384})
    by_invite = submit(api, store, room, capped, runner, budgets=huge).ok(201)
    assert by_invite["budgets"] == {"timeout_s": 120, "llm_calls": 0, "tokens": 0, "memory_mb": 384}
    assert by_invite["hold"] == RUNNER_FEE * 120

    defaults = submit(api, store, room, alice, runner).ok(201)
    assert defaults["budgets"] == limits.defaults.model_dump()


# --- 7. payer resolved and hold -----------------------------------------------------------------------


def test_without_credit_the_run_is_refused_with_402_and_nothing_is_written(api, hm, store: Store) -> None:
    store.prices.set_runner_fee(RUNNER_FEE, updated_by="test")
    poor = hm.tenant("poor")
    room = hm.room(poor)

    response = submit(api, store, room, poor, hm.runner())

    assert_denied(response, 402, "insufficient_credit")
    assert_nothing_written(store, poor.tenant_id)
    assert store.runs.list_by_caller(poor.tenant_id).items == []


@settings(billing_enforce_credits=False)
def test_with_enforcement_off_a_run_is_held_without_credit(api, hm, store: Store) -> None:
    store.prices.set_runner_fee(RUNNER_FEE, updated_by="test")
    poor = hm.tenant("poor")
    room = hm.room(poor)

    submitted = submit(api, store, room, poor, hm.runner()).ok(201)

    account = store.billing.account(poor.tenant_id)
    assert (account.balance, account.held) == (0, submitted["hold"])


def test_an_unpriced_deployment_refuses_runs(api, hm, store: Store) -> None:
    alice = hm.tenant("alice")
    store.billing.grant(alice.tenant_id, 10_000_000)
    room = hm.room(alice)
    assert_denied(submit(api, store, room, alice, hm.runner()), 403, "price_missing")
    assert_nothing_written(store, alice.tenant_id)


def test_a_suspended_payer_is_refused(api, hm, store: Store, world: dict[str, Any]) -> None:
    alice, runner = world["alice"], world["runner"]
    carol = hm.tenant("carol")
    room = hm.room(alice)
    bob = hm.invite(room)
    store.tenants.set_status(carol.tenant_id, TenantStatus.SUSPENDED)

    response = submit(api, store, room, bob, runner, headers={"X-Hivemind-Payer": carol.token})
    assert_denied(response, 403, "payer_unavailable")

    store.tenants.set_status(alice.tenant_id, TenantStatus.SUSPENDED)
    assert_denied(submit(api, store, room, bob, runner), 403, "payer_unavailable")
    assert_nothing_written(store, alice.tenant_id)


# --- 8. rate limit ------------------------------------------------------------------------------------


@settings(run_rate_limit_per_minute=2)
def test_the_rate_limit_per_caller(api, hm, store: Store, world: dict[str, Any]) -> None:
    alice, runner = world["alice"], world["runner"]
    room = hm.room(alice)
    bob = hm.invite(room)
    submit(api, store, room, alice, runner).ok(201)
    submit(api, store, room, alice, runner).ok(201)
    held = store.billing.account(alice.tenant_id).held

    assert_denied(submit(api, store, room, alice, runner), 429, "rate_limited")
    assert store.billing.account(alice.tenant_id).held == held  # the refused run holds nothing
    submit(api, store, room, bob, runner).ok(201)  # another caller has its own window


# --- operator policies ----------------------------------------------------------------------------------


class Exploding:
    name = "exploding"

    def evaluate(self, ctx: Any) -> Any:
        raise RuntimeError("secret prompt text must not leak")


@settings(admission_extra_policies="exploding")
def test_an_exploding_extra_policy_is_a_policy_error(
    api, hm, store: Store, world: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    standard = admission.extra_policy_registry
    monkeypatch.setattr(
        admission,
        "extra_policy_registry",
        lambda store: {**standard(store), "exploding": lambda arg: Exploding()},
    )
    alice, runner = world["alice"], world["runner"]
    room = hm.room(alice)

    response = submit(api, store, room, alice, runner)

    assert_denied(response, 403, "policy_error")
    assert "secret" not in response.body.decode()
    assert_nothing_written(store, alice.tenant_id)


@pytest.mark.parametrize(
    "function_settings",
    [
        {"admission_extra_policies": "no_such_policy"},
        {"admission_extra_policies": "max_prompt_bytes:lots"},
        {"admission_extra_policies": "daily_run_quota"},
    ],
    indirect=True,
)
def test_a_bad_extra_policy_configuration_denies_every_run(
    api, hm, store: Store, world: dict[str, Any]
) -> None:
    alice, runner = world["alice"], world["runner"]
    room = hm.room(alice)
    assert_denied(submit(api, store, room, alice, runner), 403, "policy_chain_unavailable")
    assert_nothing_written(store, alice.tenant_id)


@settings(admission_extra_policies="max_prompt_bytes:2000")
def test_the_max_prompt_bytes_policy(api, hm, store: Store, world: dict[str, Any]) -> None:
    alice, runner = world["alice"], world["runner"]
    room = hm.room(alice)
    submit(api, store, room, alice, runner, prompt="short").ok(201)
    assert_denied(submit(api, store, room, alice, runner, prompt="x" * 5000), 403, "prompt_too_large")


@settings(admission_extra_policies="daily_run_quota:1")
def test_the_daily_run_quota_policy(api, hm, store: Store, world: dict[str, Any]) -> None:
    alice, runner = world["alice"], world["runner"]
    room = hm.room(alice)
    submit(api, store, room, alice, runner).ok(201)
    response = submit(api, store, room, alice, runner)
    assert_denied(response, 429, "quota_exceeded")
    assert json.loads(response.body)["message"].startswith("daily run quota of 1")
