"""Agents: upload and commit (inspectable and sealed), files, visibility, hostile archives, deletion."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest

from hivemind.encoding import sha256_hex
from hivemind.envelope import open_sealed
from hivemind.store.schema import agent_source_key
from hivemind_functions.settings import FunctionSettings


def _tar_gz(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as compressed,
        tarfile.open(fileobj=compressed, mode="w", format=tarfile.PAX_FORMAT) as archive,
    ):
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _special(name: str, kind: bytes, target: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


DOCKERFILE = _file("Dockerfile", b"FROM scratch\n")

HOSTILE = {
    "path traversal": [DOCKERFILE, _file("../../etc/cron.d/evil", b"* * * * * root sh\n")],
    "absolute path": [DOCKERFILE, _file("/etc/passwd", b"root::0:0::/:/bin/sh\n")],
    "symlink": [DOCKERFILE, _special("link", tarfile.SYMTYPE, "/etc/shadow")],
    "hard link": [DOCKERFILE, _special("hard", tarfile.LNKTYPE, "Dockerfile")],
    "device": [DOCKERFILE, _special("dev", tarfile.CHRTYPE)],
    "fifo": [DOCKERFILE, _special("pipe", tarfile.FIFOTYPE)],
    "bidi name": [DOCKERFILE, _file("evil\u202egnp.py", b"x")],
    "no Dockerfile": [_file("agent.py", b"print(1)\n")],
    "gzip bomb": [DOCKERFILE, _file("zeros", bytes(20 * 1024 * 1024))],
}


def _declare_raw(api, owner, blob: bytes, *, source_digest: str = "ab" * 32, agent_id: str | None = None):
    body = {
        "name": "hostile",
        "visibility": "inspectable",
        "size": len(blob),
        "sha256": sha256_hex(blob),
        "source_digest": source_digest,
        **({"agent_id": agent_id} if agent_id else {}),
    }
    return api.post("/v1/room-agents", token=owner.token, json=body)


# --- inspectable ----------------------------------------------------------------------------------


def test_an_inspectable_agent_is_listed_after_commit_and_its_files_are_served(api, hm) -> None:
    alice = hm.tenant()
    files = {
        "Dockerfile": b"FROM hivemind/agent-base\n",
        "src/agent.py": b"print('hi')\n",
        "src/donn\u00e9es.txt": "caf\u00e9 \U0001f41d\n".encode(),
    }
    upload = hm.agent_upload(alice, archive=hm.archive(files), name="My agent")
    created = api.post("/v1/room-agents", token=alice.token, json=upload.body).ok(201)
    agent_id = created["agent"]["agent_id"]
    assert created["agent"]["state"] == "pending"
    hm.put_upload(created["upload"], upload.blob)
    assert api.get("/v1/room-agents", token=alice.token).ok()["agents"] == []
    pending = api.get("/v1/room-agents", token=alice.token, params={"include_pending": "true"}).ok()
    assert [agent["agent_id"] for agent in pending["agents"]] == [agent_id]

    committed = api.post(
        f"/v1/room-agents/{agent_id}/commit", token=alice.token, json=upload.commit_body()
    ).ok()
    assert committed["state"] == "active"
    assert committed["source_digest"] == upload.digest
    assert (committed["size"], committed["sha256"], committed["file_count"]) == (
        len(upload.blob),
        sha256_hex(upload.blob),
        3,
    )
    assert [agent["agent_id"] for agent in api.get("/v1/room-agents", token=alice.token).ok()["agents"]] == [
        agent_id
    ]

    listing = api.get(f"/v1/room-agents/{agent_id}/files", token=alice.token).ok()
    assert [entry["path"] for entry in listing["files"]] == sorted(files)
    for path, data in files.items():
        response = api.get(f"/v1/room-agents/{agent_id}/files/{path}", token=alice.token)
        assert response.status == 200, path
        assert response.body == data
        assert response.headers["x-hivemind-sha256"] == sha256_hex(data)
    response = api.get(f"/v1/room-agents/{agent_id}/files/missing.py", token=alice.token)
    assert (response.status, response.error) == (404, "file_not_found")
    # Committing the same object again is a no-op; another size is refused.
    api.post(f"/v1/room-agents/{agent_id}/commit", token=alice.token, json=upload.commit_body()).ok()
    response = api.post(
        f"/v1/room-agents/{agent_id}/commit", token=alice.token, json={**upload.commit_body(), "size": 1}
    )
    assert (response.status, response.error) == (409, "agent_committed")


def test_commit_refuses_wrong_size_sha_and_digest(hm_lambda, lambda_api, store) -> None:
    alice = hm_lambda.tenant()
    upload = hm_lambda.agent_upload(alice, archive=hm_lambda.archive())
    created = lambda_api.post("/v1/room-agents", token=alice.token, json=upload.body).ok(201)
    agent_id = created["agent"]["agent_id"]
    response = lambda_api.post(
        f"/v1/room-agents/{agent_id}/commit", token=alice.token, json=upload.commit_body()
    )
    assert (response.status, response.error) == (404, "upload_missing")
    hm_lambda.put_upload(created["upload"], upload.blob)
    wrong_size = {**upload.commit_body(), "size": len(upload.blob) + 1}
    response = lambda_api.post(f"/v1/room-agents/{agent_id}/commit", token=alice.token, json=wrong_size)
    assert (response.status, response.error) == (409, "upload_size_mismatch")
    wrong_sha = {**upload.commit_body(), "sha256": "00" * 32}
    response = lambda_api.post(f"/v1/room-agents/{agent_id}/commit", token=alice.token, json=wrong_sha)
    assert (response.status, response.error) == (409, "upload_checksum_mismatch")

    other = hm_lambda.archive({"Dockerfile": b"FROM other\n"})
    lying = lambda_api.post(
        "/v1/room-agents",
        token=alice.token,
        json={**upload.body, "agent_id": None, "size": len(other), "sha256": sha256_hex(other)},
    ).ok(201)
    hm_lambda.put_upload(lying["upload"], other)
    response = lambda_api.post(
        f"/v1/room-agents/{lying['agent']['agent_id']}/commit",
        token=alice.token,
        json={"size": len(other), "sha256": sha256_hex(other)},
    )
    assert (response.status, response.error) == (400, "agent_digest_mismatch")
    assert store.agents.get(agent_id).state.value == "pending"


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archives_are_refused_on_commit(hm_lambda, lambda_api, store, case: str) -> None:
    alice = hm_lambda.tenant()
    blob = _tar_gz(HOSTILE[case])
    created = _declare_raw(lambda_api, alice, blob).ok(201)
    hm_lambda.put_upload(created["upload"], blob)
    agent_id = created["agent"]["agent_id"]
    response = lambda_api.post(
        f"/v1/room-agents/{agent_id}/commit",
        token=alice.token,
        json={"size": len(blob), "sha256": sha256_hex(blob)},
    )
    assert (response.status, response.error) == (400, "invalid_archive"), response.body
    assert store.agents.get(agent_id).state.value == "pending"
    assert lambda_api.get("/v1/room-agents", token=alice.token).ok()["agents"] == []


def test_not_an_archive_is_refused_on_commit(hm_lambda, lambda_api) -> None:
    alice = hm_lambda.tenant()
    blob = b"#!/bin/sh\nrm -rf /\n"
    created = _declare_raw(lambda_api, alice, blob).ok(201)
    hm_lambda.put_upload(created["upload"], blob)
    response = lambda_api.post(
        f"/v1/room-agents/{created['agent']['agent_id']}/commit",
        token=alice.token,
        json={"size": len(blob), "sha256": sha256_hex(blob)},
    )
    assert (response.status, response.error) == (400, "invalid_archive")


def test_declaration_refusals(hm_lambda, lambda_api) -> None:
    alice = hm_lambda.tenant()
    upload = hm_lambda.agent_upload(alice, archive=hm_lambda.archive())
    lambda_api.post("/v1/room-agents", token=alice.token, json=upload.body).ok(201)
    response = lambda_api.post("/v1/room-agents", token=alice.token, json=upload.body)
    assert (response.status, response.error) == (409, "agent_exists")
    fresh = {**upload.body, "agent_id": None}
    assert lambda_api.post(
        "/v1/room-agents", token=alice.token, json={**fresh, "size": 51 * 1024 * 1024}
    ).error == ("payload_too_large")
    assert lambda_api.post(
        "/v1/room-agents", token=alice.token, json={**fresh, "visibility": "sealed"}
    ).error == ("invalid_input")
    sealed = hm_lambda.agent_upload(alice, archive=hm_lambda.archive(), visibility="sealed").body
    response = lambda_api.post(
        "/v1/room-agents", token=alice.token, json={**sealed, "visibility": "inspectable", "agent_id": None}
    )
    assert response.error == "invalid_input"
    response = lambda_api.post("/v1/room-agents", token=alice.token, json={**fresh, "name": "x\u0007"})
    assert response.error == "invalid_input"


# --- visibility -----------------------------------------------------------------------------------


def test_agents_are_visible_to_their_tenant_and_to_rooms_that_pin_them(api, hm) -> None:
    alice = hm.tenant()
    scope = hm.agent(alice, name="scope")
    unrelated = hm.agent(alice, name="private")
    room = hm.room(alice, scope=scope)
    bob = hm.invite(room)
    mallory = hm.tenant("mallory")

    api.get(f"/v1/room-agents/{scope.agent_id}", token=bob.token).ok()
    api.get(f"/v1/room-agents/{scope.agent_id}/files/agent.py", token=bob.token).ok()
    listed = {agent["agent_id"] for agent in api.get("/v1/room-agents", token=bob.token).ok()["agents"]}
    assert listed == {scope.agent_id}
    for caller, agent in ((bob, unrelated), (mallory, scope), (mallory, unrelated)):
        for suffix in ("", "/files", "/files/agent.py"):
            response = api.get(f"/v1/room-agents/{agent.agent_id}{suffix}", token=caller.token)
            assert (response.status, response.error) == (404, "agent_not_found"), suffix
    assert api.get("/v1/room-agents", token=mallory.token).ok()["agents"] == []


def test_a_pending_agent_is_invisible_to_invites(hm_lambda, lambda_api) -> None:
    alice = hm_lambda.tenant()
    room = hm_lambda.room(alice, query_mode="uploadable")
    bob = hm_lambda.invite(room)
    pending = hm_lambda.agent(bob, room=room, commit=False)
    response = lambda_api.get(f"/v1/room-agents/{pending.agent_id}", token=bob.token)
    assert (response.status, response.error) == (404, "agent_not_found")
    listed = lambda_api.get("/v1/room-agents", token=bob.token).ok()["agents"]
    assert pending.agent_id not in {agent["agent_id"] for agent in listed}
    response = lambda_api.get(f"/v1/room-agents/{pending.agent_id}/files", token=alice.token)
    assert (response.status, response.error) == (409, "agent_not_committed")


# --- sealed agents --------------------------------------------------------------------------------


def test_a_sealed_agent_keeps_its_source_and_key_for_the_runner_only(api, hm, store) -> None:
    alice = hm.tenant()
    runner = hm.runner()
    agent = hm.agent(alice, visibility="sealed", runner=runner)
    body = api.get(f"/v1/room-agents/{agent.agent_id}", token=alice.token).ok()
    assert (body["visibility"], body["state"], body["file_count"]) == ("sealed", "active", None)
    assert body["source_digest"] == agent.digest
    for suffix in ("/files", "/files/Dockerfile"):
        response = api.get(f"/v1/room-agents/{agent.agent_id}{suffix}", token=alice.token)
        assert (response.status, response.error) == (403, "agent_sealed")
    # What is stored is ciphertext; the sealed key opens only for the runner, bound to the agent id.
    stored = store.blobs.get_bytes(agent_source_key(agent.agent_id))
    assert agent.archive not in stored
    record = store.agents.get(agent.agent_id)
    key = open_sealed(runner.keys, record.sealed_key, info=b"hivemind-agent-v1|" + agent.agent_id.encode())
    assert key == agent.agent_key


def test_a_room_may_pin_a_sealed_scope_agent(hm_lambda, lambda_api) -> None:
    alice = hm_lambda.tenant()
    scope = hm_lambda.agent(alice, visibility="sealed")
    room = hm_lambda.room(alice, scope=scope)
    attest = lambda_api.get(f"/v1/rooms/{room.room_id}/attest", token=alice.token).ok()
    assert {agent["role"]: agent["visibility"] for agent in attest["agents"]} == {
        "scope": "sealed",
        "query": "sealed",
    }


# --- room query agents ----------------------------------------------------------------------------


def test_participants_register_query_agents_for_uploadable_rooms(api, hm, store) -> None:
    alice = hm.tenant()
    room = hm.room(alice, query_mode="uploadable")
    bob = hm.invite(room)
    mine = hm.agent(bob, room=room, name="bob's question")
    body = api.get(f"/v1/room-agents/{mine.agent_id}", token=bob.token).ok()
    assert (body["room_id"], body["tenant_id"], body["state"]) == (room.room_id, alice.tenant_id, "active")
    assert mine.agent_id in {
        agent["agent_id"] for agent in api.get("/v1/room-agents", token=bob.token).ok()["agents"]
    }
    api.get(f"/v1/room-agents/{mine.agent_id}/files/agent.py", token=alice.token).ok()
    event = store.audit.list_events(room.room_id).items[-1]
    assert (event.kind.value, event.details["agent_id"]) == ("query_agent_added", mine.agent_id)
    other_room = hm.room(alice, query_mode="uploadable")
    stranger = hm.invite(other_room)
    response = api.get(f"/v1/room-agents/{mine.agent_id}", token=stranger.token)
    assert (response.status, response.error) == (404, "agent_not_found")


def test_query_agent_refusals(hm_lambda, lambda_api) -> None:
    alice = hm_lambda.tenant()
    fixed = hm_lambda.room(alice)
    bob = hm_lambda.invite(fixed)
    body = hm_lambda.agent_upload(bob, archive=hm_lambda.archive()).body
    response = lambda_api.post(f"/v1/rooms/{fixed.room_id}/query-agents", token=bob.token, json=body)
    assert (response.status, response.error) == (409, "query_not_uploadable")
    open_room = hm_lambda.room(alice, query_mode="uploadable", query_visibility="sealed")
    carol = hm_lambda.invite(open_room)
    response = lambda_api.post(f"/v1/rooms/{open_room.room_id}/query-agents", token=carol.token, json=body)
    assert (response.status, response.error) == (400, "agent_visibility_mismatch")
    response = lambda_api.post("/v1/room-agents", token=carol.token, json=body)
    assert (response.status, response.error) == (403, "tenant_key_required")
    response = lambda_api.post(f"/v1/rooms/{open_room.room_id}/query-agents", token=bob.token, json=body)
    assert (response.status, response.error) == (404, "room_not_found")


# --- delete ---------------------------------------------------------------------------------------


def test_an_agent_pinned_by_an_active_room_cannot_be_deleted(api, hm, store) -> None:
    alice = hm.tenant()
    room = hm.room(alice)
    scope = room.agents["scope"]
    response = api.delete(f"/v1/room-agents/{scope.agent_id}", token=alice.token)
    assert (response.status, response.error) == (409, "agent_in_use")
    assert response.json()["details"] == {"rooms": [room.room_id]}
    api.delete(f"/v1/rooms/{room.room_id}", token=alice.token).ok()
    api.delete(f"/v1/room-agents/{scope.agent_id}", token=alice.token).ok()
    assert store.agents.get(scope.agent_id) is None
    assert not store.blobs.exists(agent_source_key(scope.agent_id))
    response = api.get(f"/v1/room-agents/{scope.agent_id}", token=alice.token)
    assert (response.status, response.error) == (404, "agent_not_found")


def test_only_the_owning_tenant_deletes(hm_lambda, lambda_api) -> None:
    alice = hm_lambda.tenant()
    agent = hm_lambda.agent(alice)
    mallory = hm_lambda.tenant("mallory")
    response = lambda_api.delete(f"/v1/room-agents/{agent.agent_id}", token=mallory.token)
    assert (response.status, response.error) == (404, "agent_not_found")
    lambda_api.get(f"/v1/room-agents/{agent.agent_id}", token=alice.token).ok()


class TestSmallArchiveLimit:
    @pytest.fixture
    def function_settings(self, store) -> FunctionSettings:
        return FunctionSettings(store=store.config, max_agent_archive_bytes=4096)

    def test_an_archive_over_the_deployment_limit_is_refused(self, hm_lambda, lambda_api) -> None:
        alice = hm_lambda.tenant()
        upload = hm_lambda.agent_upload(alice, archive=hm_lambda.archive({"Dockerfile": b"FROM x\n"}))
        response = lambda_api.post("/v1/room-agents", token=alice.token, json={**upload.body, "size": 5000})
        assert (response.status, response.error) == (413, "payload_too_large")
