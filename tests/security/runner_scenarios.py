"""Runs through the runner's real lifecycle (simulated TEE, fake pipeline), for the security tests."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from support.rooms import (
    Room,
    Tenant,
    agent_ref,
    build_manifest,
    create_room,
    seal_item,
    submit_run,
    upload_agent,
    write_agent_dir,
)
from support.runner_harness import TEST_COMPOSE_HASH, FakePipeline, HarnessRunner, make_runner

from hivemind.receipt import SignedReceipt
from hivemind.store import Store
from hivemind.store.schema import TableRole

SALES = b"region,amount\nnorth,10\nsouth,20\n"


def make_room(store: Store, workdir: Path, *, compose_hashes: list[str] | None = None) -> Room:
    owner = Tenant.create(store, "owner")
    agents = {
        name: upload_agent(store, owner, write_agent_dir(workdir / "agents" / name, body=f"# {name}\n"))
        for name in ("scope", "query", "mediator")
    }
    manifest = build_manifest(
        owner,
        room_id="room_" + hashlib.sha256(str(workdir).encode()).hexdigest()[:12],
        scope=agent_ref(agents["scope"]),
        query=agent_ref(agents["query"]),
        mediator=agent_ref(agents["mediator"]),
        compose_hashes=compose_hashes or [TEST_COMPOSE_HASH],
    )
    room = create_room(store, owner, manifest)
    seal_item(store, room, SALES, item_id="item_sales", metadata={"name": "sales.csv", "table": "sales"})
    return room


def make_test_runner(store: Store, workdir: Path, pipeline: FakePipeline | None = None) -> HarnessRunner:
    return make_runner(store, workdir / "runner", pipeline or FakePipeline(store=store))


@dataclass(frozen=True)
class RunOutcome:
    status: str
    error_code: str | None
    receipt_error_code: str | None
    nonces_spent: int
    pipeline_calls: int


def nonces_spent(store: Store) -> int:
    table = store.config.table_name(TableRole.NONCES)
    return len(store.clients.dynamodb.scan(TableName=table, ConsistentRead=True)["Items"])


def outcome_of(store: Store, run_id: str, pipeline: FakePipeline) -> RunOutcome:
    run = store.runs.require(run_id)
    receipt_code = None
    if run.receipt_key is not None:
        receipt_code = SignedReceipt.from_json(store.blobs.get_bytes(run.receipt_key)).receipt.error_code
    return RunOutcome(
        status=run.status.value,
        error_code=run.error_code,
        receipt_error_code=receipt_code,
        nonces_spent=nonces_spent(store),
        pipeline_calls=len(pipeline.seen),
    )


def untrusted_runner_run(store: Store, workdir: Path) -> RunOutcome:
    """A room that trusts another build than the runner's own: §16.1."""
    pipeline = FakePipeline(store=store)
    runner = make_test_runner(store, workdir, pipeline)
    room = make_room(store, workdir, compose_hashes=["0d" * 32])
    submitted = submit_run(store, room, runner_keys=runner.keys.hpke_public_keys)
    runner.lifecycle.execute(submitted.run_id, receive_count=1)
    return outcome_of(store, submitted.run_id, pipeline)
