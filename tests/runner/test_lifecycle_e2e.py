"""The real pipeline behind the runner: Docker sandboxes, the default agents, the sample people room."""

from __future__ import annotations

import csv
import hashlib
import io
import time
from pathlib import Path

import pytest
from support.rooms import (
    Tenant,
    agent_ref,
    build_manifest,
    create_room,
    open_output,
    read_receipt,
    seal_item,
    submit_run,
    upload_agent,
)
from support.runner_harness import TEST_COMPOSE_HASH, make_runner

from hivemind.models import OutputVisibility, RunStatus, Stage
from hivemind.receipt import ReceiptExpectations, verify_receipt
from hivemind.store import Store
from hivemind_runner.images import AgentImageCache
from hivemind_runner.llm import LlmConfig, LlmGateway
from hivemind_runner.pipeline import Pipeline
from hivemind_runner.sandbox.docker_backend import DockerBackend

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.moto_server]

AGENTS = Path(__file__).resolve().parents[2] / "agents"
SAMPLE = AGENTS / "examples" / "sample-data"


@pytest.fixture(scope="module")
def docker_backend() -> DockerBackend:
    for name in ("default-scope", "default-query", "default-mediator"):
        if not (AGENTS / name / "Dockerfile").is_file():
            pytest.skip(f"agents/{name} is not present")
    backend = DockerBackend()
    availability = backend.availability()
    if not availability.available:
        pytest.skip(f"Docker backend unavailable: {availability.reason}")
    return backend


def test_people_room_end_to_end_with_the_default_agents(
    store: Store, tmp_path: Path, docker_backend: DockerBackend
) -> None:
    gateway = LlmGateway(LlmConfig(providers={}))
    pipeline = Pipeline(docker_backend, AgentImageCache(docker_backend), gateway)
    runner = make_runner(store, tmp_path / "runner", pipeline)
    owner = Tenant.create(store, "owner")
    agents = {
        stage: upload_agent(store, owner, AGENTS / name)
        for stage, name in (
            (Stage.SCOPE, "default-scope"),
            (Stage.QUERY, "default-query"),
            (Stage.MEDIATOR, "default-mediator"),
        )
    }
    manifest = build_manifest(
        owner,
        room_id="room_peoplee2e",
        scope=agent_ref(agents[Stage.SCOPE]),
        query=agent_ref(agents[Stage.QUERY]),
        mediator=agent_ref(agents[Stage.MEDIATOR]),
        compose_hashes=[TEST_COMPOSE_HASH],
        output=OutputVisibility.QUERIER_ONLY,
        rules=(SAMPLE / "rules.md").read_text(),
    )
    room = create_room(store, owner, manifest)
    people = (SAMPLE / "people.csv").read_bytes()
    seal_item(store, room, people, metadata={"name": "people.csv", "table": "people"})
    prompt = "average salary by department"
    submitted = submit_run(store, room, runner_keys=runner.keys.hpke_public_keys, prompt=prompt)

    started = time.monotonic()
    runner.lifecycle.execute(submitted.run_id, receive_count=1)
    run = store.runs.require(submitted.run_id)
    assert run.status is RunStatus.COMPLETED, (run.error_code, time.monotonic() - started)

    output = open_output(store, submitted.run_id, submitted.reply_key, room=room)
    text = output.decode()
    assert "Engineering" in text
    # Departments under 5 people (Finance 4, Legal 3) are left out; no name ever leaves the room.
    assert "Legal" not in text and "Finance" not in text
    for row in csv.DictReader(io.StringIO(people.decode())):
        assert row["name"] not in text

    receipt = verify_receipt(
        read_receipt(store, submitted.run_id),
        attested_sign_pub=runner.verified(room.manifest).sign_pub,
        expected=ReceiptExpectations(
            run_id=submitted.run_id,
            room_id=room.room_id,
            manifest_hash=room.signed.manifest_hash,
            prompt_sha256=hashlib.sha256(prompt.encode()).hexdigest(),
            output_ciphertext_sha256=hashlib.sha256(store.blobs.get_bytes(run.output_key or "")).hexdigest(),
            output_plaintext_sha256=hashlib.sha256(output).hexdigest(),
            allowed_compose_hashes=frozenset({TEST_COMPOSE_HASH}),
        ),
    )
    # §16.3: the receipt covers every stage's source and image digests and the scope policy.
    assert [agent.stage for agent in receipt.agents] == [Stage.SCOPE, Stage.QUERY, Stage.MEDIATOR]
    for agent in receipt.agents:
        assert agent.source_digest == agents[agent.stage].source_digest
        assert agent.image_digest is not None and agent.image_digest.startswith("sha256:")
    assert receipt.scope_policy_hash is not None
    assert receipt.totals.tool_calls >= 1
    assert list(runner.workspaces.root.iterdir()) == []
