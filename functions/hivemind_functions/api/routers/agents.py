"""Agent routes (DESIGN §8, §12): declare an upload, commit it, list, inspect files, delete.

Upload flow, the same for library agents (``POST /v1/room-agents``) and a room's uploaded query agents
(``POST /v1/rooms/{id}/query-agents``):

1. declare: ``{agent_id, name, visibility, size, sha256, source_digest, sealed_key?}`` gives a
   presigned PUT whose signature covers the size and SHA-256 of the bytes to upload;
2. PUT the archive (inspectable) or its HMS1 ciphertext (sealed) to that URL;
3. commit: ``{size, sha256}`` again; the server verifies the stored object (and, for inspectable agents,
   the archive and its source digest) and only then lists the agent.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response
from pydantic import Field

from hivemind.envelope import RoomId, SealedEnvelope
from hivemind.models import Identifier, Sha256Hex, StrictModel, UnixSeconds, Visibility
from hivemind.store.agents import AgentRecord, AgentState
from hivemind.store.blobs import MAX_PRESIGNED_UPLOAD, PresignedUpload
from hivemind.tokens import random_id
from hivemind_functions.api.deps import Caller, ParticipantCaller, Services, ServicesDep, TenantCaller
from hivemind_functions.services import agents as service
from hivemind_functions.services.common import DisplayName

router = APIRouter(tags=["agents"])

AgentIdPath = Annotated[str, Path(pattern=r"^[a-z][a-z0-9]*_[a-z0-9]{1,64}$", description="agent id")]
FilePath = Annotated[str, Path(min_length=1, max_length=4096, description="path inside the agent")]
Cursor = Annotated[str | None, Query(max_length=2048)]
Limit = Annotated[int, Query(ge=1, le=100)]


class DeclareQueryAgentRequest(StrictModel):
    """An agent upload. Choose ``agent_id`` yourself for sealed agents: the sealing context binds it."""

    agent_id: Identifier | None = Field(default=None, description="default: the server picks one")
    name: DisplayName
    visibility: Visibility
    size: int = Field(ge=1, le=MAX_PRESIGNED_UPLOAD, description="bytes of the object to upload")
    sha256: Sha256Hex = Field(description="hex SHA-256 of the object to upload")
    source_digest: Sha256Hex = Field(
        description="the agent's source digest (hivemind.archive.source_digest of the plaintext archive); "
        "checked at commit for inspectable agents, by the runner for sealed ones"
    )
    sealed_key: SealedEnvelope | None = Field(
        default=None,
        description="sealed agents only: the HMS1 key HPKE-sealed to the runner, "
        "info b'hivemind-agent-v1|' + agent_id",
    )


class DeclareAgentRequest(DeclareQueryAgentRequest):
    room_id: RoomId | None = Field(
        default=None, description="bind the agent to one uploadable room as a query agent (owner only)"
    )


class AgentView(StrictModel):
    agent_id: str
    tenant_id: str
    name: str
    room_id: str | None
    visibility: Visibility
    source_digest: Sha256Hex
    state: AgentState
    size: int | None = Field(description="bytes of the stored source object, once committed")
    sha256: Sha256Hex | None = Field(description="SHA-256 of the stored source object, once committed")
    image_digest: str | None
    file_count: int | None = Field(description="inspectable agents: number of files")
    created_at: UnixSeconds
    updated_at: UnixSeconds


class AgentUploadResponse(StrictModel):
    agent: AgentView
    upload: PresignedUpload


class CommitAgentRequest(StrictModel):
    size: int = Field(ge=1, le=MAX_PRESIGNED_UPLOAD)
    sha256: Sha256Hex


class AgentList(StrictModel):
    agents: list[AgentView]
    cursor: str | None = None


class AgentFileView(StrictModel):
    path: str
    sha256: Sha256Hex
    size: int
    executable: bool


class AgentFiles(StrictModel):
    agent_id: str
    source_digest: Sha256Hex
    files: list[AgentFileView]


def agent_view(agent: AgentRecord) -> AgentView:
    stored = agent.source_object
    return AgentView(
        agent_id=agent.agent_id,
        tenant_id=agent.tenant_id,
        name=agent.name,
        room_id=agent.room_id,
        visibility=agent.visibility,
        source_digest=agent.source_digest,
        state=agent.state,
        size=stored.size if stored else None,
        sha256=stored.sha256 if stored else None,
        image_digest=agent.image_digest,
        file_count=len(agent.file_digests) if agent.visibility is Visibility.INSPECTABLE and stored else None,
        created_at=agent.created_at,
        updated_at=agent.updated_at,
    )


def agent_upload(
    services: Services, caller: Caller, body: DeclareQueryAgentRequest, *, room_id: str | None
) -> AgentUploadResponse:
    declared = service.AgentDeclaration(
        agent_id=body.agent_id or random_id("agent"),
        name=body.name,
        visibility=body.visibility,
        size=body.size,
        sha256=body.sha256,
        source_digest=body.source_digest,
        sealed_key=body.sealed_key,
    )
    record, upload = service.declare_agent(services, caller, declared, room_id=room_id)
    return AgentUploadResponse(agent=agent_view(record), upload=upload)


@router.post("/v1/room-agents", status_code=201, summary="Declare an agent upload; get its upload URL")
def declare_agent(
    body: DeclareAgentRequest, caller: TenantCaller, services: ServicesDep
) -> AgentUploadResponse:
    return agent_upload(services, caller, body, room_id=body.room_id)


@router.post(
    "/v1/room-agents/{agent_id}/commit", summary="Verify an uploaded agent source and list the agent"
)
def commit_agent(
    agent_id: AgentIdPath, body: CommitAgentRequest, caller: ParticipantCaller, services: ServicesDep
) -> AgentView:
    return agent_view(service.commit_agent(services, caller, agent_id, size=body.size, sha256=body.sha256))


@router.get("/v1/room-agents", summary="Agents the caller may see")
def list_agents(
    caller: ParticipantCaller,
    services: ServicesDep,
    include_pending: bool = False,
    cursor: Cursor = None,
    limit: Limit = 50,
) -> AgentList:
    agents, next_cursor = service.list_agents(
        services, caller, include_pending=include_pending, cursor=cursor, limit=limit
    )
    return AgentList(agents=[agent_view(agent) for agent in agents], cursor=next_cursor)


@router.get("/v1/room-agents/{agent_id}", summary="One agent")
def get_agent(agent_id: AgentIdPath, caller: ParticipantCaller, services: ServicesDep) -> AgentView:
    return agent_view(service.visible_agent(services, caller, agent_id))


@router.get("/v1/room-agents/{agent_id}/files", summary="Files of an inspectable agent")
def list_agent_files(agent_id: AgentIdPath, caller: ParticipantCaller, services: ServicesDep) -> AgentFiles:
    agent, manifest = service.agent_files(services, caller, agent_id)
    return AgentFiles(
        agent_id=agent.agent_id,
        source_digest=agent.source_digest,
        files=[AgentFileView.model_validate(entry.model_dump()) for entry in manifest.files],
    )


@router.get(
    "/v1/room-agents/{agent_id}/files/{path:path}",
    summary="One file of an inspectable agent (raw bytes)",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "the file's bytes"}},
)
def get_agent_file(
    agent_id: AgentIdPath, path: FilePath, caller: ParticipantCaller, services: ServicesDep
) -> Response:
    data, digest = service.agent_file(services, caller, agent_id, path)
    return Response(
        content=data,
        media_type="application/octet-stream",
        headers={"x-hivemind-sha256": digest, "x-content-type-options": "nosniff"},
    )


@router.delete("/v1/room-agents/{agent_id}", summary="Delete an agent (refused while a room pins it)")
def delete_agent(agent_id: AgentIdPath, caller: TenantCaller, services: ServicesDep) -> AgentView:
    return agent_view(service.delete_agent(services, caller, agent_id))
