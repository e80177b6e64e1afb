"""Agent uploads: pack a directory deterministically, seal it when asked, upload, commit (DESIGN §8).

An agent directory is packed with :func:`hivemind.archive.pack_directory` (the same files always give
the same bytes) and pinned by its source digest (:func:`hivemind.archive.source_digest`, over the files,
not the archive bytes). Inspectable agents are uploaded as they are: participants can read them. Sealed
agents are HMS1-sealed under a fresh random 32-byte key with :func:`hivemind.seal.agent_source_context`,
and that key is HPKE-sealed to the verified runner's attested keys with
:func:`hivemind.envelope.seal_agent_key` (bound to the agent id): only an attested runner can open the
source.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hivemind.archive import pack_directory as pack_agent_directory
from hivemind.archive import validate_archive
from hivemind.attestation import VerifiedRunner
from hivemind.envelope import AGENT_KEY_BYTES, HpkePublicKeys, seal_agent_key
from hivemind.models import Visibility
from hivemind.seal import agent_source_context, seal_bytes
from hivemind.tokens import random_id
from hmctl.client import ApiClient, Progress


@dataclass(frozen=True)
class PackedAgent:
    """A packed agent directory: the archive, its source digest and its files."""

    path: Path
    archive: bytes
    digest: str
    file_count: int

    @property
    def name(self) -> str:
        return self.path.resolve().name or "agent"


def pack_agent(path: Path) -> PackedAgent:
    """Pack and validate an agent directory (InvalidArchive names the offending file)."""
    archive = pack_agent_directory(path)
    manifest = validate_archive(archive)
    return PackedAgent(path=path, archive=archive, digest=manifest.digest, file_count=len(manifest.files))


@dataclass(frozen=True)
class AgentUpload:
    """The body of an agent declaration and the bytes to PUT (sealed or not)."""

    body: dict[str, Any]
    blob: bytes


def agent_upload_body(
    packed: PackedAgent,
    *,
    name: str,
    visibility: Visibility,
    tenant_id: str,
    room_id: str | None,
    runner: VerifiedRunner | None,
    agent_id: str | None = None,
) -> AgentUpload:
    """The declaration for ``packed``; sealed agents are sealed here to ``runner``'s attested keys.

    The agent id is chosen here (or by the caller): a sealed agent's sealing context binds it.
    """
    agent_id = agent_id or random_id("agent")
    body: dict[str, Any] = {
        "agent_id": agent_id,
        "name": name,
        "visibility": visibility.value,
        "source_digest": packed.digest,
    }
    if visibility is Visibility.INSPECTABLE:
        blob = packed.archive
    else:
        if runner is None:
            raise ValueError("a sealed agent is sealed to a verified runner")
        agent_key = os.urandom(AGENT_KEY_BYTES)
        context = agent_source_context(tenant_id, room_id, agent_id)
        blob = seal_bytes(packed.archive, key=agent_key, context=context)
        sealed_key = seal_agent_key(
            HpkePublicKeys.from_suites(runner.hpke_public_keys), agent_key, agent_id=agent_id
        )
        body["sealed_key"] = sealed_key.model_dump(mode="json")
    body.update(size=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    return AgentUpload(body=body, blob=blob)


def upload_agent(
    api: ApiClient,
    packed: PackedAgent,
    *,
    name: str,
    visibility: Visibility,
    tenant_id: str,
    runner: VerifiedRunner | None,
    room_id: str | None = None,
    agent_id: str | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Declare, upload and commit an agent; returns the committed agent view.

    ``room_id`` registers a query agent for that uploadable room (owner or invite holder); otherwise
    the agent joins the caller's library.
    """
    upload = agent_upload_body(
        packed,
        name=name,
        visibility=visibility,
        tenant_id=tenant_id,
        room_id=room_id,
        runner=runner,
        agent_id=agent_id,
    )
    path = f"/v1/rooms/{room_id}/query-agents" if room_id is not None else "/v1/room-agents"
    declared = api.post(path, upload.body)
    agent_id = declared["agent"]["agent_id"]
    api.upload(declared["upload"], io.BytesIO(upload.blob), len(upload.blob), progress=progress)
    return api.post(
        f"/v1/room-agents/{agent_id}/commit", {"size": upload.body["size"], "sha256": upload.body["sha256"]}
    )
