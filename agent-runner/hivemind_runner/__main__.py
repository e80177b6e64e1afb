"""``python -m hivemind_runner``: the confidential runner process (docs/runner.md).

Start-up, in order: read the configuration; get the key seed and identity from the TEE; derive the keys;
take a quote over them and publish the attestation document; wipe workspaces a killed predecessor left;
then serve the runs queue until SIGTERM or SIGINT, finish what is running (within the grace period) and
mark the runner stopped.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from pydantic import ValidationError

from hivemind.errors import HivemindError
from hivemind.models import TeeKind
from hivemind.store import AwsClients, Store
from hivemind.store.runners import RunnerStatus
from hivemind.trust import SignedRelease
from hivemind_runner import __version__
from hivemind_runner.attestation import AttestationPublisher, build_attestation
from hivemind_runner.config import RunnerSettings, host_runner_id
from hivemind_runner.images import AgentImageCache
from hivemind_runner.keys import RunnerKeys
from hivemind_runner.lifecycle import PipelineRunner, RunLifecycle
from hivemind_runner.llm import LlmConfig, LlmGateway
from hivemind_runner.pipeline import Pipeline, PipelineConfig
from hivemind_runner.sandbox import select_backend
from hivemind_runner.scoped.spill import spill_to
from hivemind_runner.tee import DstackTee, SimulatedTee, TeeError, TeeProvider
from hivemind_runner.telemetry import StructuredLogger, configure_logging
from hivemind_runner.worker import RunWorker, WorkerSettings
from hivemind_runner.workspace import WorkspaceFactory

# Under the workspace base (tmpfs): the unlinked temporary files of SQLite's big sorts and groupings.
SQLITE_SPILL_DIR = "sqlite-spill"

# The pipeline needs the runner's keys (tenants' provider keys are sealed to them) and the store.
PipelineFactory = Callable[[RunnerSettings, RunnerKeys, Store], PipelineRunner]


def make_tee(settings: RunnerSettings) -> TeeProvider:
    if settings.tee is TeeKind.TDX:
        return DstackTee(endpoint=settings.dstack_endpoint)
    return SimulatedTee(settings.seed_file, compose_hash=settings.compose_hash)


def read_release(path: Path | None) -> SignedRelease | None:
    """The operator's release statement for this build (rooms in mode ``operator_updates``)."""
    if path is None:
        return None
    try:
        return SignedRelease.model_validate_json(path.read_bytes())
    except (OSError, ValidationError) as exc:
        raise TeeError(f"cannot read the release statement {path}: {type(exc).__name__}") from None


def runner_id_for(settings: RunnerSettings, instance_id: str | None) -> str:
    if settings.runner_id is not None:
        return settings.runner_id
    if instance_id:
        return "runner_" + instance_id[:64]
    return host_runner_id()


class Runner:
    """One runner process, assembled: keys, attestation, workspaces, lifecycle and worker."""

    def __init__(
        self,
        settings: RunnerSettings,
        *,
        tee: TeeProvider,
        pipeline_factory: PipelineFactory,
        store: Store | None = None,
        logger: StructuredLogger | None = None,
    ) -> None:
        self.settings = settings
        self.store = store or Store(AwsClients(settings.store))
        self._logger = logger or StructuredLogger()
        self._tee = tee
        self.keys = RunnerKeys.from_seed(tee.seed())
        identity = tee.identity()
        self.runner_id = runner_id_for(settings, identity.instance_id)
        self._logger = self._logger.bind(runner_id=self.runner_id)
        release = read_release(settings.release_file)
        document = build_attestation(
            runner_id=self.runner_id,
            tee=tee,
            keys=self.keys,
            version=__version__,
            now=self.store.clock(),
            release=release,
        )
        self.publisher = AttestationPublisher(
            self.store, document, interval_s=settings.attestation_heartbeat_s, logger=self._logger
        )
        self.workspaces = WorkspaceFactory(
            settings.workspace_root(self.runner_id), size_mb=settings.workspace_mb
        )
        self.lifecycle = RunLifecycle(
            self.store,
            self.keys,
            runner_id=self.runner_id,
            identity=identity,
            quote_sha256=document.quote_sha256,
            pipeline=pipeline_factory(settings, self.keys, self.store),
            workspaces=self.workspaces,
            max_attempts=settings.max_attempts,
            release=release,
            logger=self._logger,
        )
        self.worker = RunWorker(
            self.store,
            self.lifecycle,
            WorkerSettings(
                concurrency=settings.concurrency,
                wait_time_s=settings.wait_time_s,
                visibility_timeout_s=settings.visibility_timeout_s,
                visibility_heartbeat_s=settings.visibility_heartbeat_s,
                shutdown_grace_s=settings.shutdown_grace_s,
            ),
            logger=self._logger,
        )

    def serve(self) -> int:
        """Publish, serve until :meth:`stop`, then mark the runner stopped. Returns unfinished runs."""
        # Process-wide, before any thread of the runner uses SQLite: big sorts and groupings spill to
        # tmpfs files, not the runner's heap (docs/runner.md, "SQLite scratch").
        spilled = spill_to(self.settings.workspace_dir / SQLITE_SPILL_DIR)
        swept = self.workspaces.sweep()
        self.publisher.publish()
        self.publisher.start()
        self._logger.event(
            "runner_started",
            tee=self._tee.kind.value,
            compose_hash=self.publisher.document.compose_hash,
            sign_pub=self.keys.sign_pub,
            workspaces_swept=swept,
            tmpfs_mounts=self.workspaces.mounts_tmpfs,
            sqlite_spill=spilled,
        )
        try:
            self.worker.serve()
        finally:
            self.publisher.stop(RunnerStatus.STOPPED)
        unfinished = self.worker.unfinished()
        self._logger.event("runner_stopped", unfinished=unfinished)
        return unfinished

    def stop(self) -> None:
        """Begin a graceful shutdown (safe from a signal handler: no I/O on the calling thread)."""
        self.worker.stop()
        # Clients should stop choosing this runner now, not only once the running runs are done.
        threading.Thread(target=self.publisher.drain, name="runner-drain", daemon=True).start()


def build_pipeline(settings: RunnerSettings, keys: RunnerKeys, store: Store) -> PipelineRunner:
    """The real pipeline: the configured sandbox backend, its image cache and the LLM gateway.

    Payers' own provider keys (sealed to this runner, kept on the tenant record) take precedence over
    the operator's keys for the runs they pay for.
    """
    backend = select_backend(settings.backend.value)
    gateway = LlmGateway(
        LlmConfig.from_env(), runner_keys=keys.hpke, tenant_keys=store.tenants.sealed_provider_keys
    )
    return Pipeline(
        backend, AgentImageCache(backend), gateway, config=PipelineConfig(prestart=settings.prestart)
    )


def main(argv: list[str] | None = None, *, pipeline_factory: PipelineFactory = build_pipeline) -> int:
    """Run the runner until SIGTERM/SIGINT. Configuration comes from the environment only."""
    del argv
    try:
        settings = RunnerSettings.from_env()
    except HivemindError as exc:
        print(f"hivemind-runner: {exc.message}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    logger = StructuredLogger()
    try:
        runner = Runner(settings, tee=make_tee(settings), pipeline_factory=pipeline_factory, logger=logger)
    except HivemindError as exc:
        logger.error("runner_start_failed", error_code=exc.code)
        print(f"hivemind-runner: {exc.message}", file=sys.stderr)
        return 1

    def on_signal(signum: int, frame: FrameType | None) -> None:
        del frame
        logger.event("shutdown_requested", signal=signal.Signals(signum).name)
        runner.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    unfinished = runner.serve()
    if unfinished:
        # Runs past the grace period are abandoned to redelivery; do not wait for their threads.
        os._exit(75)
    return 0


if __name__ == "__main__":
    sys.exit(main())
