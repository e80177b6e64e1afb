"""A tenant's own LLM provider keys, sealed to the runner: ``/v1/tenant/provider-keys`` (DESIGN §8)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import pytest

from hivemind.envelope import HpkeKeyPair, SealedEnvelope, open_provider_key, provider_key_info, seal_to
from hivemind.errors import EnvelopeError
from hivemind.manifest import KeyRotation, sign_key_rotation
from hivemind.store import Store
from hivemind.store.base import Table
from hivemind.store.schema import TableRole
from hivemind.tokens import Secret, TokenKind
from hivemind_functions.settings import FunctionSettings

if TYPE_CHECKING:
    from conftest import Harness, RunnerHandle

KEYS = "/v1/tenant/provider-keys"


@pytest.fixture
def function_settings(store: Store) -> FunctionSettings:
    return FunctionSettings(
        store=store.config, self_serve_signup=True, allowed_llm_providers=("openrouter", "tinfoil")
    )


def sealed(runner: RunnerHandle, tenant_id: str, provider: str, api_key: str) -> dict[str, Any]:
    """What ``hmctl tenant set-provider-key`` sends: the key HPKE-sealed to the runner's attested keys."""
    envelope = seal_to(runner.public_keys, api_key.encode(), info=provider_key_info(tenant_id, provider))
    return {"sealed_key": envelope.model_dump(mode="json"), "runner_id": runner.runner_id}


def test_store_list_replace_and_remove_a_provider_key(api, hm: Harness, store: Store) -> None:
    alice = hm.tenant("alice")
    runner = hm.runner()
    body = sealed(runner, alice.tenant_id, "openrouter", "sk-or-alice-1")

    stored = api.put(f"{KEYS}/openrouter", token=alice.token, json=body).ok()
    assert stored == {
        "tenant_id": alice.tenant_id,
        "provider": "openrouter",
        "runner_id": runner.runner_id,
        "updated_at": stored["updated_at"],
        "stored": True,
    }
    listed = api.get(KEYS, token=alice.token).ok()
    assert listed == {
        "provider_keys": [
            {"provider": "openrouter", "runner_id": runner.runner_id, "updated_at": stored["updated_at"]}
        ]
    }
    assert "sealed_key" not in listed["provider_keys"][0]

    # The runner's lookup gets the sealed envelope, and only the runner's key opens it, for this
    # tenant and this provider.
    lookup = store.tenants.sealed_provider_keys(alice.tenant_id)
    assert set(lookup) == {"openrouter"}
    stored_key = SealedEnvelope.from_json(lookup["openrouter"])
    opened = open_provider_key(runner.keys, stored_key, tenant_id=alice.tenant_id, provider="openrouter")
    assert opened == "sk-or-alice-1"
    with pytest.raises(EnvelopeError):
        open_provider_key(runner.keys, stored_key, tenant_id=alice.tenant_id, provider="tinfoil")
    with pytest.raises(EnvelopeError):
        open_provider_key(
            HpkeKeyPair.generate(), stored_key, tenant_id=alice.tenant_id, provider="openrouter"
        )

    # A second key for another provider, then a replacement sealed to another runner.
    api.put(
        f"{KEYS}/tinfoil", token=alice.token, json=sealed(runner, alice.tenant_id, "tinfoil", "tf-1")
    ).ok()
    other_runner = hm.runner()
    api.put(
        f"{KEYS}/openrouter",
        token=alice.token,
        json=sealed(other_runner, alice.tenant_id, "openrouter", "sk-or-alice-2"),
    ).ok()
    listed = api.get(KEYS, token=alice.token).ok()["provider_keys"]
    assert [(entry["provider"], entry["runner_id"]) for entry in listed] == [
        ("openrouter", other_runner.runner_id),
        ("tinfoil", runner.runner_id),
    ]
    replaced = store.tenants.sealed_provider_keys(alice.tenant_id)["openrouter"]
    assert (
        open_provider_key(
            other_runner.keys,
            SealedEnvelope.from_json(replaced),
            tenant_id=alice.tenant_id,
            provider="openrouter",
        )
        == "sk-or-alice-2"
    )

    removed = api.delete(f"{KEYS}/openrouter", token=alice.token).ok()
    assert removed == {"tenant_id": alice.tenant_id, "provider": "openrouter", "removed": True}
    assert [entry["provider"] for entry in api.get(KEYS, token=alice.token).ok()["provider_keys"]] == [
        "tinfoil"
    ]
    assert set(store.tenants.sealed_provider_keys(alice.tenant_id)) == {"tinfoil"}
    again = api.delete(f"{KEYS}/openrouter", token=alice.token).ok()
    assert again["removed"] is False


def test_keys_are_per_tenant_and_survive_a_key_rotation(hm_lambda: Harness, lambda_api, store: Store) -> None:
    alice, carol = hm_lambda.tenant("alice"), hm_lambda.tenant("carol")
    runner = hm_lambda.runner()
    lambda_api.put(
        f"{KEYS}/openrouter",
        token=alice.token,
        json=sealed(runner, alice.tenant_id, "openrouter", "sk-alice"),
    ).ok()
    assert lambda_api.get(KEYS, token=carol.token).ok() == {"provider_keys": []}
    assert lambda_api.delete(f"{KEYS}/openrouter", token=carol.token).ok()["removed"] is False
    assert set(store.tenants.sealed_provider_keys(alice.tenant_id)) == {"openrouter"}

    # Rotating the tenant key changes the auth hash and owner keys, not the tenant the key is bound to.
    new = dataclasses.replace(alice, secret=Secret.generate(TokenKind.TENANT))
    certificate = sign_key_rotation(
        KeyRotation(
            tenant_id=alice.tenant_id,
            old_sign_pub=alice.sign_pub,
            new_sign_pub=new.sign_pub,
            new_box_pub=new.box_pub,
            rotated_at=store.clock(),
        ),
        alice.sign_key,
    )
    lambda_api.post(
        "/v1/tenant/key-rotation",
        token=alice.token,
        json={"new_auth_hash": new.auth_hash, "rotation": certificate.model_dump(mode="json"), "rooms": []},
    ).ok()
    listed = lambda_api.get(KEYS, token=new.token).ok()["provider_keys"]
    assert [entry["provider"] for entry in listed] == ["openrouter"]
    sealed_json = store.tenants.sealed_provider_keys(alice.tenant_id)["openrouter"]
    assert (
        open_provider_key(
            runner.keys,
            SealedEnvelope.from_json(sealed_json),
            tenant_id=alice.tenant_id,
            provider="openrouter",
        )
        == "sk-alice"
    )


def test_provider_key_refusals(hm_lambda: Harness, lambda_api, store: Store) -> None:
    alice = hm_lambda.tenant("alice")
    room = hm_lambda.room(alice)
    invite = hm_lambda.invite(room)
    admin = hm_lambda.admin()
    runner = hm_lambda.runner()
    body = sealed(runner, alice.tenant_id, "openrouter", "sk-or-alice")

    for token in (invite.token, admin.token):
        for method, path, payload in (
            ("PUT", f"{KEYS}/openrouter", body),
            ("GET", KEYS, None),
            ("DELETE", f"{KEYS}/openrouter", None),
        ):
            kwargs = {"json": payload} if payload is not None else {}
            response = lambda_api.request(method, path, token=token, **kwargs)
            assert (response.status, response.error) == (403, "tenant_key_required"), (method, path)
    assert lambda_api.get(KEYS).error == "credentials_missing"

    refusals = [
        ("mistral", body, 400, "provider_not_allowed"),
        ("openrouter", {**body, "runner_id": "runner_nobody"}, 400, "runner_not_found"),
        ("OpenRouter", body, 400, "invalid_input"),
        (
            "openrouter",
            {**body, "sealed_key": {**body["sealed_key"], "suite": "rot13"}},
            400,
            "invalid_input",
        ),
        ("openrouter", {"runner_id": runner.runner_id}, 400, "invalid_input"),
        ("openrouter", {**body, "api_key": "sk-plaintext"}, 400, "invalid_input"),
    ]
    for provider, payload, status, code in refusals:
        response = lambda_api.put(f"{KEYS}/{provider}", token=alice.token, json=payload)
        assert (response.status, response.error) == (status, code), provider
        assert "sk-plaintext" not in response.body.decode()
    assert lambda_api.get(KEYS, token=alice.token).ok() == {"provider_keys": []}
    assert store.tenants.sealed_provider_keys(alice.tenant_id) == {}


def test_the_tenant_record_keeps_keys_out_of_dumps(hm_lambda: Harness, store: Store) -> None:
    alice = hm_lambda.tenant("alice")
    runner = hm_lambda.runner()
    envelope = SealedEnvelope.model_validate(sealed(runner, alice.tenant_id, "openrouter", "k")["sealed_key"])
    store.tenants.put_provider_key(
        alice.tenant_id, "openrouter", sealed_key=envelope, runner_id=runner.runner_id
    )
    tenant = store.tenants.require(alice.tenant_id)
    assert tenant.provider_keys["openrouter"].sealed_key == envelope
    assert "provider_keys" not in tenant.model_dump()
    assert tenant.to_item()["provider_keys"]["openrouter"]["runner_id"] == runner.runner_id
    # A tenant item written before provider keys existed (no map yet) still takes one.
    legacy_tenant = hm_lambda.tenant("legacy")
    table = Table(store.clients, TableRole.TENANTS)
    item = table.get({"tenant_id": legacy_tenant.tenant_id})
    assert item is not None
    del item["provider_keys"], item["key_rotations"]
    table.put(item)
    store.tenants.put_provider_key(
        legacy_tenant.tenant_id, "tinfoil", sealed_key=envelope, runner_id=runner.runner_id
    )
    assert set(store.tenants.require(legacy_tenant.tenant_id).provider_keys) == {"tinfoil"}
    assert store.tenants.delete_provider_key(legacy_tenant.tenant_id, "openrouter") is False
