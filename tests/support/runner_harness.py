"""A runner for tests: the real lifecycle and worker, a simulated TEE, and a fake pipeline.

    pipeline = FakePipeline()
    runner = make_runner(store, tmp_path, pipeline)
    submitted = submit_run(store, room, runner_keys=runner.keys.hpke_public_keys)
    runner.lifecycle.execute(submitted.run_id, receive_count=1)

``FakePipeline`` stands in for :class:`hivemind_runner.pipeline.Pipeline` where the real one (and its
containers) is not the point: it records what it was given (decrypted items, extracted agent files,
prompt, budgets), reports each stage, and returns a configurable result.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hivemind.attestation import AttestationDocument, VerifiedRunner, verify_attestation
from hivemind.manifest import RoomManifest
from hivemind.models import Budgets, Stage, StageUsage
from hivemind.receipt import ReceiptAgent
from hivemind.store import Store
from hivemind_runner.attestation import build_attestation
from hivemind_runner.keys import RunnerKeys
from hivemind_runner.lifecycle import RunLifecycle
from hivemind_runner.pipeline import PipelineInputs, PipelineResult
from hivemind_runner.tee import SimulatedTee
from hivemind_runner.telemetry import StructuredLogger
from hivemind_runner.worker import RunWorker, WorkerSettings
from hivemind_runner.workspace import WorkspaceFactory

TEST_COMPOSE_HASH = "c0" * 32
IMAGE_DIGEST = "sha256:" + "1d" * 32
SCOPE_POLICY_HASH = "5c" * 32


@dataclass(frozen=True)
class SeenRun:
    """What the pipeline was given, captured while the run's workspace still existed."""

    run_id: str
    prompt: str
    budgets: Budgets
    workspace: Path
    items: dict[str, bytes]
    item_metadata: dict[str, dict[str, str]]
    agent_files: dict[Stage, dict[str, bytes]]
    stages_reported: list[Stage]
    run_stage_in_store: list[Stage | None]


@dataclass
class FakePipeline:
    """Returns ``output`` (default: a JSON summary of what it saw) or fails with ``error_code``."""

    store: Store | None = None
    output: bytes | None = None
    error_code: str | None = None
    artifacts: dict[str, bytes] = field(default_factory=dict)
    llm_usage: list[dict[str, object]] = field(
        default_factory=lambda: [
            {"provider": "openrouter", "model": "m1", "prompt_tokens": 10, "completion_tokens": 5},
            {"provider": "openrouter", "model": "m1", "prompt_tokens": 1, "completion_tokens": 2},
        ]
    )
    # Called after the first stage is reported; a test can block, take the run over, or raise here.
    during: Callable[[PipelineInputs], None] | None = None
    seen: list[SeenRun] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, inputs: PipelineInputs, on_stage: Callable[[Stage], None]) -> PipelineResult:
        reported: list[Stage] = []
        in_store: list[Stage | None] = []
        for position, stage in enumerate(inputs.agents):
            on_stage(stage)
            reported.append(stage)
            if self.store is not None:
                in_store.append(self.store.runs.require(inputs.run_id).stage)
            if position == 0 and self.during is not None:
                self.during(inputs)
        items = {item.name: item.path.read_bytes() for item in inputs.items}
        seen = SeenRun(
            run_id=inputs.run_id,
            prompt=inputs.prompt,
            budgets=inputs.budgets,
            workspace=inputs.workspace,
            items=items,
            item_metadata={item.name: dict(item.metadata) for item in inputs.items},
            agent_files={
                stage: {
                    path.relative_to(agent.source_dir).as_posix(): path.read_bytes()
                    for path in sorted(agent.source_dir.rglob("*"))
                    if path.is_file()
                }
                for stage, agent in inputs.agents.items()
            },
            stages_reported=reported,
            run_stage_in_store=in_store,
        )
        with self._lock:
            self.seen.append(seen)
        agents = [
            ReceiptAgent(
                stage=stage,
                agent_id=agent.agent_id,
                source_digest=agent.source_digest,
                image_digest=IMAGE_DIGEST,
            )
            for stage, agent in inputs.agents.items()
        ]
        usage = [
            StageUsage(stage=stage, duration_ms=1500, tool_calls={"sql": 2}, llm_calls=1, prompt_tokens=5)
            for stage in inputs.agents
        ]
        if self.error_code is not None:
            return PipelineResult(
                ok=False,
                output=None,
                output_content_type="text/plain",
                agents=agents,
                usage=usage,
                llm_usage=list(self.llm_usage),
                error_code=self.error_code,
            )
        artifact_paths: dict[str, Path] = {}
        if self.artifacts:
            directory = inputs.workspace / "artifacts"
            directory.mkdir(exist_ok=True)
            for name, data in self.artifacts.items():
                (directory / name).write_bytes(data)
                artifact_paths[name] = directory / name
        output = self.output
        if output is None:
            summary = {
                "prompt": inputs.prompt,
                "items": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(items.items())},
            }
            output = json.dumps(summary, sort_keys=True).encode()
        return PipelineResult(
            ok=True,
            output=output,
            output_content_type="application/json",
            artifacts=artifact_paths,
            scope_policy_hash=SCOPE_POLICY_HASH,
            agents=agents,
            usage=usage,
            llm_usage=list(self.llm_usage),
        )


@dataclass
class HarnessRunner:
    """The pieces of one runner, wired as ``python -m hivemind_runner`` wires them."""

    store: Store
    keys: RunnerKeys
    document: AttestationDocument
    lifecycle: RunLifecycle
    workspaces: WorkspaceFactory
    runner_id: str

    def verified(self, manifest: RoomManifest) -> VerifiedRunner:
        """What a client gets from verifying this runner for ``manifest``'s room (simulated allowed)."""
        return verify_attestation(
            self.document,
            collateral=None,
            now=int(time.time()),
            trust=manifest.runner_trust,
            allow_simulated=True,
        )

    def worker(self, **settings: object) -> RunWorker:
        options: dict[str, object] = {
            "wait_time_s": 1,
            "visibility_timeout_s": 30,
            "visibility_heartbeat_s": 5.0,
            "shutdown_grace_s": 30.0,
        }
        options.update(settings)
        return RunWorker(self.store, self.lifecycle, WorkerSettings(**options))  # type: ignore[arg-type]


def make_runner(
    store: Store,
    state_dir: Path,
    pipeline: object,
    *,
    compose_hash: str = TEST_COMPOSE_HASH,
    runner_id: str = "runner_test",
    max_attempts: int = 3,
    mount_tmpfs: bool = False,
) -> HarnessRunner:
    tee = SimulatedTee(state_dir / "runner-seed", compose_hash=compose_hash)
    keys = RunnerKeys.from_seed(tee.seed())
    document = build_attestation(runner_id=runner_id, tee=tee, keys=keys, version="test", now=store.clock())
    workspaces = WorkspaceFactory(state_dir / "workspaces" / runner_id, mount_tmpfs=mount_tmpfs)
    lifecycle = RunLifecycle(
        store,
        keys,
        runner_id=runner_id,
        identity=tee.identity(),
        quote_sha256=document.quote_sha256,
        pipeline=pipeline,  # type: ignore[arg-type]
        workspaces=workspaces,
        max_attempts=max_attempts,
        logger=StructuredLogger(),
    )
    return HarnessRunner(
        store=store,
        keys=keys,
        document=document,
        lifecycle=lifecycle,
        workspaces=workspaces,
        runner_id=runner_id,
    )
