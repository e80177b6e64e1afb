"""``hmctl`` against the real control-plane app (uvicorn on loopback) on a moto deployment.

Everything goes over real HTTP: the API routes, presigned PUTs and GETs to the moto bucket. Runs are
executed by the real runner lifecycle (simulated TEE, a fake pipeline instead of containers) in a
worker thread, as ``hmctl dev up`` runs it.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from hmctl_harness import Cli, make_room, write_agent
from support.runner_harness import FakePipeline, make_runner

from hivemind.keys import auth_hash
from hivemind.store import AwsClients, Store, StoreConfig
from hivemind.store.agents import AgentRecord
from hivemind.store.bootstrap import create_all
from hivemind.store.credentials import CredentialKind, CredentialRecord
from hivemind.store.runners import RunnerRecord
from hivemind.store.schema import TableRole
from hivemind.tokens import Secret, TokenKind
from hivemind_functions.api.app import create_app
from hivemind_functions.api.deps import Services
from hivemind_functions.settings import FunctionSettings
from hmctl.profiles import ProfileStore

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def service_url(store: Store) -> Iterator[str]:
    settings = FunctionSettings(store=store.config, self_serve_signup=True)
    app = create_app(Services.for_store(store, settings))
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def runner(store: Store, tmp_path: Path) -> Any:
    """The real runner lifecycle with a fake pipeline, published as a live runner."""
    harness = make_runner(store, tmp_path / "runner", FakePipeline(store=store))
    now = store.clock()
    store.runners.publish(
        RunnerRecord(
            runner_id=harness.runner_id,
            tee=harness.document.tee,
            compose_hash=harness.document.compose_hash,
            version=harness.document.version,
            attestation=harness.document.model_dump(mode="json"),
            started_at=now,
            heartbeat_at=now,
        )
    )
    return harness


@pytest.fixture
def real(config_dir: Path, service_url: str, runner: Any) -> Cli:
    return Cli(ProfileStore.from_environment(), None, service_url)


@pytest.fixture
def owner_room(real: Cli, tmp_path: Path, rules_file: Path) -> dict[str, Any]:
    agent = write_agent(tmp_path / "agent")
    real.signup("owner")
    room = make_room(real, agent, rules_file)
    data = tmp_path / "orders.csv"
    data.write_text("region,amount\nnorth,10\nsouth,20\n")
    item = real.ok("--profile", "owner", "room", "add-data", room["room_id"], "--file", str(data), "--json")
    return {**room, "item": item}


def test_signup_whoami_and_balance(real: Cli) -> None:
    created = real.signup("alice")
    me = real.ok("--profile", "alice", "whoami", "--json")
    assert me["tenant_id"] == created["tenant_id"] and me["kind"] == "tenant"
    assert real.ok("--profile", "alice", "balance", "--json")["account"]["balance"] == 0


def test_room_lifecycle_over_real_http(real: Cli, owner_room: dict[str, Any], tmp_path: Path) -> None:
    room_id = owner_room["room_id"]
    assert owner_room["item"]["state"] == "committed" and owner_room["item"]["metadata"]["table"] == "orders"
    rooms = real.ok("--profile", "owner", "room", "list", "--json")["rooms"]
    assert [r["room_id"] for r in rooms] == [room_id] and rooms[0]["status"] == "active"
    items = real.ok("--profile", "owner", "room", "data", room_id, "--json")["items"]
    assert [i["metadata"]["name"] for i in items] == ["orders.csv"]

    shared = real.ok(
        "--profile", "owner", "room", "share", room_id, "--uses", "2", "--expires", "1d", "--json"
    )
    real.signup("bob")
    inspected = real.ok("--profile", "bob", "room", "inspect", shared["link"], "--json")
    assert inspected["accepted"] is False and inspected["manifest_hash"] == owner_room["manifest_hash"]
    assert [r["verified"] for r in inspected["runners"]] == [True]
    real.ok("--profile", "bob", "room", "accept", shared["link"], input="y\n")

    # Narrowing is enforced on the client first, and the derived invite is real on the service.
    wider = real.run("--profile", "bob", "room", "share", shared["link"], "--uses", "3")
    assert wider.exit_code == 6 and "may only narrow" in wider.stderr
    child = real.ok("--profile", "bob", "room", "share", shared["link"], "--uses", "1", "--json")
    assert child["parent_id"] == shared["invite_id"]
    invites = real.ok("--profile", "owner", "room", "invites", room_id, "--json")["invites"]
    assert {i["invite_id"] for i in invites} >= {shared["invite_id"], child["invite_id"]}

    revoked = real.ok("--profile", "owner", "room", "revoke-invite", room_id, shared["invite_id"], "--json")
    assert set(revoked["revoked"]) == {shared["invite_id"], child["invite_id"]}
    refused = real.run("--profile", "bob", "room", "inspect", shared["link"])
    assert refused.exit_code == 3 and "credential_revoked" in refused.stderr

    updated = real.ok("--profile", "owner", "room", "trust", room_id, "--add", "d1" * 32, "--json")
    assert updated["revision"] == 2 and "d1" * 32 in updated["runner_trust"]["allowed_compose_hashes"]

    real.ok("--profile", "owner", "room", "rm-data", room_id, owner_room["item"]["item_id"], "--json")
    assert real.ok("--profile", "owner", "room", "data", room_id, "--json")["items"] == []

    fresh = real.ok("--profile", "owner", "room", "share", room_id, "--json")["link"]
    deleted = real.ok("--profile", "owner", "room", "delete", room_id, "-y", "--json")
    assert deleted["status"] == "deleted"
    gone = real.run("--profile", "bob", "room", "inspect", fresh)
    assert gone.exit_code == 4 and "room_deleted" in gone.stderr


def test_agents_upload_list_and_files(real: Cli, tmp_path: Path) -> None:
    real.signup("owner")
    agent = write_agent(tmp_path / "lib-agent")
    uploaded = real.ok("--profile", "owner", "agent", "upload", str(agent), "--name", "lib", "--json")
    assert uploaded["state"] == "active" and uploaded["visibility"] == "inspectable"
    listed = real.ok("--profile", "owner", "agent", "list", "--json")["agents"]
    assert [a["agent_id"] for a in listed] == [uploaded["agent_id"]]
    files = real.ok("--profile", "owner", "agent", "files", uploaded["agent_id"], "--json")
    assert sorted(f["path"] for f in files["files"]) == ["Dockerfile", "main.py"]
    shown = real.run("--profile", "owner", "agent", "files", uploaded["agent_id"], "main.py")
    assert shown.exit_code == 0 and shown.stdout == "print('an agent')\n"


@pytest.mark.skipif(
    "sealed_key" not in AgentRecord.model_fields,
    reason="hivemind.store.agents.AgentRecord has no sealed_key yet (sealed uploads need it)",
)
def test_a_sealed_agent_upload(real: Cli, tmp_path: Path) -> None:
    real.signup("owner")
    agent = write_agent(tmp_path / "sealed-agent")
    sealed = real.ok("--profile", "owner", "agent", "upload", str(agent), "--sealed", "--json")
    assert sealed["visibility"] == "sealed" and sealed["state"] == "active"
    refused = real.run("--profile", "owner", "agent", "files", sealed["agent_id"])
    assert refused.exit_code != 0


def test_admin_billing_and_credit_codes(real: Cli, store: Store) -> None:
    admin = Secret.generate(TokenKind.ADMIN)
    digest = auth_hash(admin)
    store.credentials.put(
        CredentialRecord(
            auth_hash=digest, kind=CredentialKind.ADMIN, token_id=digest[:16], created_at=store.clock()
        )
    )
    real.ok("init", "admin", "--service", real.service, "--key-stdin", "--json", input=admin.token() + "\n")
    tenant = real.signup("payer")["tenant_id"]
    granted = real.ok("--profile", "admin", "admin", "billing", "grant", tenant, "--usd", "12.5", "--json")
    assert granted["entry"]["amount"] == 12_500_000
    code = real.ok("--profile", "admin", "admin", "credit-codes", "create", "--usd", "2", "--json")
    assert code["code"].startswith("hmcc_") and code["code_hash"] == auth_hash(Secret.parse(code["code"]))
    redeemed = real.ok("--profile", "payer", "redeem-credit", code["code"], "--json")
    assert redeemed["account"]["balance"] == 14_500_000
    assert real.ok("--profile", "payer", "balance", "--json")["account"]["available"] == 14_500_000
    listed = real.ok("--profile", "admin", "admin", "credit-codes", "list", "--json")["codes"]
    assert [c["uses"] for c in listed] == [1]
    real.ok("--profile", "admin", "admin", "credit-codes", "revoke", code["code_id"], "--json")
    verified = real.ok("--profile", "admin", "admin", "billing", "verify", "--json")
    assert verified["ok"] is True and verified["tenants_checked"] >= 1
    accounts = real.ok("--profile", "admin", "admin", "billing", "accounts", "--json")["accounts"]
    assert {a["tenant_id"] for a in accounts} >= {tenant}
    csv = real.run("--profile", "admin", "admin", "billing", "ledger", "--tenant", tenant, "--format", "csv")
    assert csv.exit_code == 0 and csv.stdout.count("\n") == 3  # a header and two entries
    assert [
        t["tenant_id"] for t in real.ok("--profile", "admin", "admin", "tenants", "list", "--json")["tenants"]
    ] == [tenant]
    # A tenant key is not an admin key.
    refused = real.run("--profile", "payer", "admin", "billing", "accounts")
    assert refused.exit_code == 2 and "admin commands need an admin" in refused.stderr


# A grant of 999 USD keeps the entry's shape (its hash breaks); a negative grant breaks the entry model.
@pytest.mark.parametrize("forged_amount", ["999000000", "-1"])
def test_admin_billing_verify_fails_on_a_broken_chain(real: Cli, store: Store, forged_amount: str) -> None:
    admin = Secret.generate(TokenKind.ADMIN)
    digest = auth_hash(admin)
    store.credentials.put(
        CredentialRecord(
            auth_hash=digest, kind=CredentialKind.ADMIN, token_id=digest[:16], created_at=store.clock()
        )
    )
    real.ok("init", "admin", "--service", real.service, "--key-stdin", input=admin.token() + "\n")
    tenant = real.signup("payer")["tenant_id"]
    real.ok("--profile", "admin", "admin", "billing", "grant", tenant, "--usd", "1", "--json")
    # Someone edits the ledger table behind the service's back.
    store.clients.dynamodb.update_item(
        TableName=store.config.table_name(TableRole.LEDGER),
        Key={"tenant_id": {"S": tenant}, "seq": {"N": "1"}},
        UpdateExpression="SET amount = :a",
        ExpressionAttributeValues={":a": {"N": forged_amount}},
    )
    failed = real.run("--profile", "admin", "admin", "billing", "verify", "--json")
    assert failed.exit_code == 5, repr(failed)
    assert failed.json()["ok"] is False and failed.json()["tenants_failed"] == 1
    (line,) = [line for line in failed.json()["tenants"] if not line["ok"]]
    assert (line["tenant_id"], line["error"], line["seq"]) == (tenant, "ledger_invalid", 1)


def test_ask_end_to_end_with_the_real_runner_lifecycle(
    real: Cli, owner_room: dict[str, Any], runner: Any, store: Store
) -> None:
    # Runs are never free: without a runner-time price the admission chain refuses (price_missing).
    store.prices.set_runner_fee(1, updated_by="test")
    worker = runner.worker()
    thread = threading.Thread(target=worker.serve, daemon=True)
    thread.start()
    try:
        real.signup("bob")
        # Runs through an invite are paid by the room owner, who sponsors its invites.
        owner = real.ok("--profile", "owner", "whoami", "--json")
        store.billing.grant(owner["tenant_id"], 1_000_000)
        real.ok("--profile", "bob", "room", "accept", owner_room["link"], input="y\n")
        answer = real.ok("--profile", "bob", "room", "ask", owner_room["link"], "total by region?", "--json")
    finally:
        worker.stop()
        thread.join(timeout=30)
    assert answer["verified"] is True and answer["status"] == "completed"
    assert json.loads(answer["output"])["prompt"] == "total by region?"
    refused = real.run("--profile", "owner", "run", "output", answer["run_id"])
    assert refused.exit_code == 4 and "output_not_visible" in refused.stderr


def test_admin_export_and_import_into_another_deployment(
    real: Cli,
    owner_room: dict[str, Any],
    store: Store,
    store_env: dict[str, str],
    moto_server: str,
    tmp_path: Path,
) -> None:
    archive = tmp_path / "deployment.tar"
    exported = real.ok("admin", "export", str(archive), "--json")
    assert (
        exported["source"]["prefix"] == store.config.prefix and exported["objects"] == 2
    )  # one agent (scope and query) and one item
    target = StoreConfig(prefix=f"t{uuid.uuid4().hex[:12]}", region="us-east-1", endpoint_url=moto_server)
    create_all(AwsClients(target))
    imported = real.ok("admin", "import", str(archive), "--prefix", target.prefix, "--json")
    assert imported["conflicts"] == [] and imported["verified"]["rooms"] == 1
    assert imported["verified"]["items"] == 1
    again = real.ok("admin", "import", str(archive), "--prefix", target.prefix, "--json")
    assert again["objects_written"] == 0 and again["conflicts"] == []
