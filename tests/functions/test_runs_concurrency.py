"""50 concurrent run submissions over real HTTP (uvicorn + moto) from one payer with credit for exactly
10 holds: 10 succeed, 40 get 402, the balance never goes negative and the ledger chain verifies."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from hivemind.envelope import HpkeSuite, RunEnvelope, seal_run_envelope
from hivemind.keys import public_bytes, wrap_key
from hivemind.ledger import LedgerKind
from hivemind.store import Store
from hivemind_functions.settings import FunctionSettings

RUNNER_FEE = 10
SUBMISSIONS = 50
AFFORDABLE = 10


@pytest.fixture
def function_settings(store: Store) -> FunctionSettings:
    # The per-caller rate limit would otherwise answer some of the 50 with 429 before billing decides.
    return FunctionSettings(store=store.config, self_serve_signup=True, run_rate_limit_per_minute=1000)


@pytest.fixture
def api(http_api: Any) -> Any:
    return http_api


@pytest.mark.slow
def test_fifty_concurrent_submissions_never_overdraw(http_api, hm, store: Store) -> None:
    store.prices.set_runner_fee(RUNNER_FEE, updated_by="test")
    alice = hm.tenant("alice")
    room = hm.room(alice)
    runner = hm.runner()
    hold = RUNNER_FEE * room.manifest.budgets.defaults.timeout_s
    store.billing.grant(alice.tenant_id, AFFORDABLE * hold)
    bodies = []
    for _ in range(SUBMISSIONS):
        envelope = RunEnvelope.create(
            room_id=room.room_id,
            manifest_hash=room.manifest_hash,
            bearer_id=alice.bearer_id,
            wrap_key=wrap_key(alice.secret, room.room_id),
            prompt="how many rows?",
            reply_pub=public_bytes(X25519PrivateKey.generate()),
            budgets=room.manifest.budgets.defaults,
            now=store.clock(),
        )
        bodies.append(
            {
                "envelope": seal_run_envelope(
                    runner.public_keys, envelope, suite=HpkeSuite.X25519
                ).model_dump(mode="json"),
                "runner_id": runner.runner_id,
                "prompt_sha256": envelope.prompt_sha256(),
                "idempotency_key": uuid.uuid4().hex,
            }
        )
    url = f"{http_api.client.base_url}/v1/rooms/{room.room_id}/runs"
    headers = {"authorization": f"Bearer {alice.token}"}

    def submit(body: dict[str, Any]) -> httpx.Response:
        with httpx.Client(timeout=120) as client:
            return client.post(url, json=body, headers=headers)

    with ThreadPoolExecutor(max_workers=SUBMISSIONS) as pool:
        responses = list(pool.map(submit, bodies))

    statuses = sorted(response.status_code for response in responses)
    assert statuses == [201] * AFFORDABLE + [402] * (SUBMISSIONS - AFFORDABLE), statuses
    assert {response.json()["error"] for response in responses if response.status_code == 402} == {
        "insufficient_credit"
    }
    account = store.billing.account(alice.tenant_id)
    assert (account.balance, account.held, account.available) == (AFFORDABLE * hold, AFFORDABLE * hold, 0)
    entries = list(store.billing.entries(alice.tenant_id))
    assert all(entry.balance_after >= 0 and entry.balance_after - entry.held_after >= 0 for entry in entries)
    assert [entry.kind for entry in entries].count(LedgerKind.USAGE_HOLD) == AFFORDABLE
    assert store.billing.verify(alice.tenant_id) == len(entries) == 1 + AFFORDABLE
    created = {response.json()["run_id"] for response in responses if response.status_code == 201}
    assert {run.run_id for run in store.runs.list_by_caller(alice.tenant_id, limit=100).items} == created
