"""The run pipeline inside the runner: scope -> query -> mediator -> output gate (DESIGN §8).

Interface used by the runner's worker (the implementation follows in this module).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from hivemind.manifest import RoomManifest
from hivemind.models import Budgets, Stage, StageUsage, Visibility
from hivemind.receipt import ReceiptAgent

from hivemind_runner.sandbox.base import PreparedAgent, SandboxBackend


@dataclass(frozen=True)
class StageAgent:
    """The agent of one stage: its id, its extracted source directory and the digest the room pins."""

    stage: Stage
    agent_id: str
    source_dir: Path
    source_digest: str
    visibility: Visibility


@dataclass(frozen=True)
class RoomItem:
    """A room item, decrypted into the run's tmpfs workspace, with its plaintext metadata."""

    item_id: str
    name: str
    content_type: str
    metadata: dict[str, str]
    path: Path


@dataclass(frozen=True)
class PipelineInputs:
    run_id: str
    manifest: RoomManifest
    prompt: str
    budgets: Budgets
    workspace: Path
    items: list[RoomItem]
    agents: dict[Stage, StageAgent]
    payer_tenant_id: str


@dataclass
class PipelineResult:
    ok: bool
    output: bytes | None
    output_content_type: str
    artifacts: dict[str, Path] = field(default_factory=dict)
    scope_policy_hash: str | None = None
    agents: list[ReceiptAgent] = field(default_factory=list)
    usage: list[StageUsage] = field(default_factory=list)
    llm_usage: list[dict] = field(default_factory=list)
    error_code: str | None = None


class AgentImages(Protocol):
    """Turns an agent's verified source into a runnable agent (the runner's image cache)."""

    def prepare(self, source_dir: Path, source_digest: str) -> PreparedAgent: ...


class Pipeline:
    def __init__(self, backend: SandboxBackend, images: AgentImages, llm_gateway: object) -> None:
        self.backend = backend
        self.images = images
        self.llm_gateway = llm_gateway

    def run(self, inputs: PipelineInputs, on_stage: Callable[[Stage], None]) -> PipelineResult:
        raise NotImplementedError("the pipeline implementation lands next in this module")
