"""The run pipeline inside the runner: scope -> query -> mediator -> output gate (DESIGN §8, docs/bridge.md).

:meth:`Pipeline.run` takes a verified run (decrypted items and agent sources in the run's tmpfs
workspace) and produces the output, or a stable error code, plus everything the receipt names:

1. **prepare**: every stage's agent is built (or found in the image cache) from its verified source;
   the run's wall-clock budget starts after this, so a cold image build does not eat it;
2. **scope** (full read, ``simulate``, ``policy/check``): returns a ScopePolicy as JSON. The runner parses it
   (:func:`hivemind.policy.parse_policy`), narrows it against the room's ``data_policy``
   (:func:`hivemind.policy.narrow`) and checks it against the data; anything wrong fails the run
   closed with ``scope_policy_invalid``. The policy is data: nothing the agent wrote runs here (§16.4);
3. **query**: scoped tools over a database built from the policy's projection only (§16.6); it never
   sees the policy itself (§16.5); artifacts only when the room's egress allows them;
4. **mediator** (when the room has one): the prompt, the raw answer, the rules and the policy's output
   rules, no data tools; it returns the final answer or ``{"refusal": ...}``;
5. **gate**: the runner applies ``output.deny`` (the run fails with ``output_denied`` and nothing
   leaves) and ``output.redact`` to the final answer and to text artifacts, deterministically.

Each stage runs in its own sandbox with its own bridge socket and session token. Budgets: the run's
``timeout_s`` is one wall-clock budget shared by the stages (each gets what is left), ``memory_mb``
limits each container, LLM calls and tokens are one meter for the run (simulations included).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from pydantic import Field, ValidationError

from hivemind.archive import pack_directory, validate_archive
from hivemind.errors import HivemindError, InvalidPolicy
from hivemind.manifest import RoomManifest
from hivemind.models import Budgets, Stage, StageUsage, StrictModel, Visibility
from hivemind.policy import ScopePolicy, policy_hash
from hivemind.receipt import ReceiptAgent
from hivemind_runner.bridge import (
    ArtifactStore,
    BridgeLimits,
    BridgeListener,
    BridgeServer,
    SimulationLimit,
    StageFinished,
    StageOutput,
    StageServices,
    StageSession,
    StoredArtifact,
    room_policy_checker,
    tool_call_chain,
)
from hivemind_runner.llm import LlmGateway, RunLlm
from hivemind_runner.sandbox.base import (
    Outcome,
    PreparedAgent,
    SandboxBackend,
    SandboxError,
    SandboxResult,
    SandboxSpec,
    create_bridge_socket_dir,
)
from hivemind_runner.scoped import (
    DataLoadError,
    ItemInfo,
    ScopedDatabase,
    ScopedLimits,
    build_scoped_database,
    full_read_database,
    resolve_policy,
)
from hivemind_runner.scoped import RoomItem as ScopedItem
from hivemind_runner.telemetry import PhaseClock

logger = logging.getLogger(__name__)

TEXT_CONTENT_TYPE = "text/plain; charset=utf-8"
JSON_CONTENT_TYPE = "application/json"
ERROR_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")
# Agent-reported failure codes that keep their name in the run's error code; any other code becomes
# ``<stage>_failed``. A closed set: an agent must not be able to write free text into the receipt.
PASSED_FAILURE_CODES = frozenset({"budget_exceeded", "llm_provider_error", "provider_not_allowed"})
ORDER = (Stage.SCOPE, Stage.QUERY, Stage.MEDIATOR)
# How long the end of the scope stage waits for simulations it stopped to be torn down.
_SIMULATION_DRAIN_S = 60
# How often the pipeline looks whether a stage has posted its answer while its sandbox runs.
_ANSWER_POLL_S = 0.005


# --- the interface the runner's worker uses -----------------------------------------------------------


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
    """What a run produced. ``output`` is set exactly when ``ok``; ``error_code`` exactly when not.

    ``llm_usage`` lists what settlement charges: tokens spent through the operator's provider keys,
    per provider and model (calls made with the payer's own key are billed by the provider directly).
    """

    ok: bool
    output: bytes | None
    output_content_type: str
    artifacts: dict[str, Path] = field(default_factory=dict)
    scope_policy_hash: str | None = None
    agents: list[ReceiptAgent] = field(default_factory=list)
    usage: list[StageUsage] = field(default_factory=list)
    llm_usage: list[dict] = field(default_factory=list)
    error_code: str | None = None
    # Where the pipeline's time went, contiguous, in milliseconds (the runner's ``phase_ms`` log).
    phases: dict[str, int] = field(default_factory=dict)


class AgentImages(Protocol):
    """Turns an agent's verified source into a runnable agent: the runner's
    :class:`~hivemind_runner.images.AgentImageCache`."""

    def get(self, source_dir: Path, source_digest: str) -> PreparedAgent: ...


class PipelineConfig(StrictModel):
    """Tunables of the pipeline; defaults follow docs/agents.md and docs/bridge.md."""

    bridge: BridgeLimits = Field(default_factory=BridgeLimits)
    scoped: ScopedLimits = Field(default_factory=ScopedLimits)
    max_simulations: int = Field(default=5, ge=0, le=100, description="simulate calls per run")
    simulation_timeout_s: int = Field(default=120, ge=1, le=3600, description="cap of one simulation")
    stop_grace_s: float = Field(default=2.0, ge=0, le=60, description="time to exit after the output")
    prestart: bool = Field(
        default=True, description="start every stage's sandbox when the run starts (docs/bridge.md)"
    )
    prestart_max_wait_s: float = Field(
        default=60.0,
        ge=1,
        le=240,
        description="a pre-started sandbox that waited longer for its stage is replaced by a fresh one",
    )
    socket_root: Path | None = Field(
        default=None,
        description="parent of the per-stage socket directories; must be traversable by uid 10001",
    )
    admission_extra_policies: str | None = Field(
        default=None, description="operator policy specs appended to the bridge's admission chain"
    )
    max_inspectable_bytes: int = Field(
        default=4 * 1024 * 1024, ge=0, description="query agent source text shown to the scope stage"
    )


# --- internal control flow ------------------------------------------------------------------------------


class RunFailed(Exception):
    """The run fails with ``code``: a stable identifier, never room data (the pipeline returns it as
    ``PipelineResult.error_code``)."""

    def __init__(self, code: str):
        super().__init__(code)
        self.code = code


class _CallbackFailed(Exception):
    """``on_stage`` raised: the worker stops the run; the cause is re-raised to it unchanged."""

    def __init__(self, cause: BaseException):
        super().__init__("on_stage failed")
        self.cause = cause


@dataclass
class _StageRun:
    session: StageSession
    result: SandboxResult


class _StageSandbox:
    """One sandbox of a stage (or of a simulation), run on a thread of its own, with its bridge socket.

    Made before its stage begins (docs/bridge.md, "Pre-started sandboxes") or when it begins: first its
    socket directory and a listening bridge socket (the session token is chosen with it), then, by
    :meth:`start`, the sandbox. The agent starts and its first bridge call waits in the socket's
    backlog until :meth:`attach` serves the stage's session; from then on the sandbox is the stage's.
    Its answer is read as soon as the session accepted one (:meth:`answer`): the container's exit and
    removal overlap the next stage.

    On the sandbox's thread, in order: the sandbox runs to its end (the container is gone) and its
    bridge closes (the socket is gone); ``settle`` finishes what the stage's usage depends on (the
    scope stage's simulations); ``release`` frees what the stage's services held (its database; nothing
    can query it any more). The pipeline joins every sandbox it made, used or not, before it returns,
    so no sandbox or socket outlives the run and usage and diagnostics are complete.
    """

    def __init__(self, run: _Run, stage: Stage, *, name: str, timeout_s: int):
        self.stage = stage
        self.name = name
        self._backend = run.pipeline.backend
        self._grace_s = run.config.stop_grace_s
        self.stop = threading.Event()
        self._ended = threading.Event()
        self._lock = threading.Lock()
        self._session: StageSession | None = None
        self._server: BridgeServer | None = None
        self._served_at = 0.0
        self._settle: Callable[[], None] = lambda: None
        self._release: Callable[[], None] = lambda: None
        self._cancel: threading.Event | None = None
        self._result: SandboxResult | None = None
        self._error: BaseException | None = None
        self._started_at = 0.0
        self._closed = threading.Event()
        self._socket_dir = create_bridge_socket_dir(run.pipeline.socket_root())
        try:
            self._listener = BridgeListener(self._socket_dir / "bridge.sock", run.config.bridge)
        except BaseException:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            raise
        try:
            self._spec = SandboxSpec(
                agent=run.prepared[stage],
                role=stage,
                bridge_socket=self._listener.socket_path,
                session_token=self._listener.token,
                memory_mb=run.inputs.budgets.memory_mb,
                timeout_s=timeout_s,
            )
            self._thread = threading.Thread(
                target=self._body, name=f"stage-{name}-{run.inputs.run_id}", daemon=True
            )
        except BaseException:
            self._close_socket()
            raise

    @property
    def token(self) -> str:
        return self._listener.token

    def start(self) -> _StageSandbox:
        try:
            self._started_at = time.monotonic()
            self._thread.start()
        except BaseException:
            self._close_socket()
            raise
        return self

    def waited_s(self) -> float:
        """How long the sandbox has been running without its stage."""
        return time.monotonic() - self._started_at

    def attach(
        self,
        session: StageSession,
        *,
        settle: Callable[[], None] = lambda: None,
        release: Callable[[], None] = lambda: None,
        cancel: threading.Event | None = None,
    ) -> bool:
        """Serve ``session`` (made with :attr:`token`) on the sandbox's socket. False, and nothing
        served, when the sandbox has ended already: its stage needs a fresh one."""
        with self._lock:
            if self._ended.is_set():
                return False
            self._server = self._listener.serve(session)
            self._served_at = time.monotonic()
            self._session = session
            self._settle, self._release, self._cancel = settle, release, cancel
        threading.Thread(
            target=self._stop_after_output, name=f"{self._thread.name}-watch", daemon=True
        ).start()
        return True

    def discard(self) -> None:
        """Stop a sandbox no stage will use (its thread winds it down; join it still)."""
        self.stop.set()

    def _body(self) -> None:
        try:
            self._result = self._backend.run(self._spec, stop=self.stop)
        except BaseException as exc:
            self._error = exc
        with self._lock:
            self._ended.set()
        try:
            self._close_socket()
        except BaseException as exc:
            self._error = self._error or exc
        finally:
            self._closed.set()
        if self._session is None:
            return
        try:
            self._settle()
        except BaseException as exc:
            self._error = self._error or exc
        try:
            self._release()
        except BaseException as exc:
            logger.error("stage %s of a run failed to release: %s", self.stage.value, type(exc).__name__)

    def _close_socket(self) -> None:
        try:
            if self._server is not None:
                self._server.close()
            self._listener.close()
        finally:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    def _stop_after_output(self) -> None:
        """Stop the sandbox once the stage posted its output (after a grace to exit), or on cancel."""
        session = self._session
        assert session is not None
        while not self._ended.is_set():
            if self._cancel is not None and self._cancel.is_set():
                self.stop.set()
                return
            if session.finished.wait(0.05):
                if not self._ended.wait(self._grace_s):
                    self.stop.set()
                return

    def answer(self) -> StageOutput | None:
        """The stage's output as soon as the session accepted one; None if the sandbox ended without."""
        session = self._session
        assert session is not None, "answer() of a sandbox no session was attached to"
        while not self._closed.is_set():
            if session.finished.wait(_ANSWER_POLL_S) and session.output is not None:
                return session.output
        return session.output

    def join(self) -> SandboxResult:
        """The sandbox's result once its thread is done; the time before its stage began is not the
        stage's (a pre-started agent only waited)."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        result = self._result
        if self._session is not None and self._served_at > result.started_at:
            ended = result.started_at + result.duration_ms / 1000
            result = result.model_copy(
                update={
                    "started_at": self._served_at,
                    "duration_ms": max(0, int((ended - self._served_at) * 1000)),
                }
            )
        return result

    def stage_run(self) -> _StageRun:
        result = self.join()
        assert self._session is not None
        return _StageRun(self._session, result)


def stage_answer(stage: Stage, output: StageOutput | None, outcome: Outcome) -> StageOutput:
    """The stage's answer, or :class:`RunFailed` with the code the run ends with.

    An accepted answer counts whatever happened to the sandbox afterwards. A failure the agent reported
    keeps its code only when it is one of :data:`PASSED_FAILURE_CODES`; a stage that posted nothing
    failed by timeout, memory, or otherwise.
    """
    if output is not None and not output.failed:
        return output
    if output is not None:
        code = output.error_code or ""
        raise RunFailed(f"{stage.value}_{code}" if code in PASSED_FAILURE_CODES else f"{stage.value}_failed")
    if outcome is Outcome.TIMEOUT:
        raise RunFailed(f"{stage.value}_timeout")
    if outcome is Outcome.OOM:
        raise RunFailed(f"{stage.value}_out_of_memory")
    raise RunFailed(f"{stage.value}_failed")


def _budget_view(budgets: Budgets, timeout_s: int, llm: RunLlm) -> dict[str, int]:
    return {
        "timeout_s": timeout_s,
        "llm_calls": llm.remaining_calls(),
        "tokens": llm.remaining_tokens(),
        "memory_mb": budgets.memory_mb,
    }


def _answer_value(output: StageOutput) -> str | dict[str, Any]:
    if output.kind == "text" and output.text is not None:
        return output.text
    if output.kind == "json" and output.data is not None:
        return output.data
    raise ValueError("a failure has no answer")


def _redact_json(value: Any, redact: Callable[[str], str]) -> Any:
    """Every string, key and number of a JSON value through ``redact``; a number it changes becomes text."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        rendered = json.dumps(value)
        redacted = redact(rendered)
        return value if redacted == rendered else redacted
    if isinstance(value, list):
        return [_redact_json(item, redact) for item in value]
    if isinstance(value, dict):
        return {redact(key): _redact_json(item, redact) for key, item in value.items()}
    return value


def _json_leaves(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _json_leaves(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _json_leaves(item)
    elif value is not None and not isinstance(value, bool):
        yield json.dumps(value)


def _serialize(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


# --- the pipeline ---------------------------------------------------------------------------------------


class Pipeline:
    """Runs the three stages of a run. One instance serves many runs, concurrently."""

    def __init__(
        self,
        backend: SandboxBackend,
        images: AgentImages,
        llm_gateway: LlmGateway,
        *,
        config: PipelineConfig | None = None,
    ):
        self.backend = backend
        self.images = images
        self.llm_gateway = llm_gateway
        self.config = config or PipelineConfig()
        self.chain = tool_call_chain(
            max_tool_calls=self.config.bridge.max_tool_calls,
            max_log_lines=self.config.bridge.max_log_lines,
            extra_specs=self.config.admission_extra_policies,
        )

    def socket_root(self) -> Path:
        """The parent of the stage socket directories: created 0711 if missing, and refused unless it
        is a real directory of the runner's user that nobody else can write (whoever can rename
        entries in it could swap a stage's socket for their own)."""
        root = self.config.socket_root or Path(tempfile.gettempdir()) / "hivemind-bridges"
        root.mkdir(mode=0o711, parents=True, exist_ok=True)
        info = os.lstat(root)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
            raise SandboxError(f"{root} is not a directory of the runner's user closed to other writers")
        return root

    def run(self, inputs: PipelineInputs, on_stage: Callable[[Stage], None]) -> PipelineResult:
        """Run the pipeline; a failed run is a result with an error code, not an exception.

        Exceptions raised by ``on_stage`` propagate unchanged (the worker lost the run, for example).
        """
        try:
            return _Run(self, inputs, on_stage).execute()
        except _CallbackFailed as exc:
            raise exc.cause from None


class _Run:
    """The state of one run through the pipeline."""

    def __init__(self, pipeline: Pipeline, inputs: PipelineInputs, on_stage: Callable[[Stage], None]):
        self.pipeline = pipeline
        self.config = pipeline.config
        self.inputs = inputs
        self.manifest = inputs.manifest
        self.on_stage = on_stage
        self.prepared: dict[Stage, PreparedAgent] = {}
        self.receipt_agents: list[ReceiptAgent] = []
        self.usage: dict[Stage, StageUsage] = {}
        self.policy_digest: str | None = None
        self.llm: RunLlm | None = None
        self.deadline = 0.0
        self.items: list[ScopedItem] = []
        self.simulations = 0
        self.active_simulations = 0
        self.simulation_state = threading.Condition()
        self.diagnostics = inputs.workspace / "diagnostics"
        self.artifact_store: ArtifactStore | None = None
        self.simulation_runs: list[_StageRun] = []
        self.live: list[_StageSandbox] = []
        self.prestarted: dict[Stage, _StageSandbox] = {}
        self.unused: list[_StageSandbox] = []
        self.phases = PhaseClock()
        self.scoped = self.config.scoped

    @property
    def meter(self) -> RunLlm:
        if self.llm is None:
            raise RuntimeError("the run's LLM meter is opened before the first stage")
        return self.llm

    # --- the run ---

    def execute(self) -> PipelineResult:
        try:
            gated = self._stages_then_join()
            return self._result(
                ok=True, output=gated.output, content_type=gated.content_type, artifacts=gated.artifacts
            )
        except RunFailed as failure:
            return self._result(ok=False, error_code=failure.code)
        except _CallbackFailed:
            raise
        except HivemindError as exc:
            # The runner's own machinery failed (sandbox, engine, store): its code, never its text.
            logger.error("pipeline of run %s failed: %s", self.inputs.run_id, exc.code)
            code = exc.code if ERROR_CODE.fullmatch(exc.code) else "internal_error"
            return self._result(ok=False, error_code=code)
        except Exception as exc:
            logger.error("pipeline of run %s failed with %s", self.inputs.run_id, type(exc).__name__)
            return self._result(ok=False, error_code="internal_error")

    def _stages_then_join(self) -> GatedOutput:
        """The stages and the gate; every stage's sandbox has ended when this returns or raises."""
        try:
            gated = self._stages()
        except BaseException:
            self._join_stages()  # the first failure stands; a later one in a winding-down stage does not
            raise
        failure = self._join_stages()
        if failure is not None:
            raise failure
        return gated

    def _stages(self) -> GatedOutput:
        self._check_agents()
        self._prepare_agents()
        self.scoped = self._scoped_limits()
        self.items = self._scoped_items()
        self.llm = self.pipeline.llm_gateway.open_run(
            run_id=self.inputs.run_id,
            allowed_providers=self.manifest.egress.llm_providers,
            budgets=self.inputs.budgets,
            payer_tenant_id=self.inputs.payer_tenant_id,
        )
        self.phases.lap("images")
        self.deadline = time.monotonic() + self.inputs.budgets.timeout_s
        self._prestart()
        policy = self._scope_stage()
        answer = self._query_stage(policy)
        final = self._mediator_stage(policy, answer) if Stage.MEDIATOR in self.prepared else answer
        stored = self.artifact_store.stored if self.artifact_store is not None else {}
        gated = gate_output(policy, final, stored)
        self.phases.lap("gate")
        return gated

    def _join_stages(self) -> BaseException | None:
        """Wait for every sandbox of the run to end; record its diagnostics and usage. Returns the first
        error a stage's thread raised (the sandbox could not be run or cleaned up), if any. Pre-started
        sandboxes no stage used are stopped; what they did is kept with the diagnostics."""
        for sandbox in self.prestarted.values():
            sandbox.discard()
            self.unused.append(sandbox)
        self.prestarted.clear()
        failure: BaseException | None = None
        for sandbox in self.live:
            try:
                run = sandbox.stage_run()
            except BaseException as exc:
                failure = failure or exc
                continue
            self._record(sandbox.stage, run.result, sandbox.name, run.session)
            extra = list(self.simulation_runs) if sandbox.stage is Stage.SCOPE else []
            self._account(sandbox.stage, [run, *extra])
        for sandbox in self.unused:
            try:
                self._record(sandbox.stage, sandbox.join(), f"{sandbox.name}-unused", None)
            except BaseException as exc:
                # Not the run's failure: the stage ran in a fresh sandbox, or never ran.
                logger.warning(
                    "an unused sandbox of run %s failed: %s", self.inputs.run_id, type(exc).__name__
                )
        self.live.clear()
        self.unused.clear()
        self.phases.lap("teardown")
        return failure

    def _result(
        self,
        *,
        ok: bool,
        output: bytes | None = None,
        content_type: str = TEXT_CONTENT_TYPE,
        artifacts: dict[str, Path] | None = None,
        error_code: str | None = None,
    ) -> PipelineResult:
        return PipelineResult(
            ok=ok,
            output=output if ok else None,
            output_content_type=content_type,
            artifacts=(artifacts or {}) if ok else {},
            scope_policy_hash=self.policy_digest,
            agents=list(self.receipt_agents),
            usage=[self.usage[stage] for stage in ORDER if stage in self.usage],
            llm_usage=self.llm.provider_usage() if self.llm is not None else [],
            error_code=None if ok else error_code,
            phases=self.phases.phases(),
        )

    # --- preparation ---

    def _check_agents(self) -> None:
        """The agents handed in are the ones the signed manifest pins (the worker checked; so do we)."""
        agents, manifest = self.inputs.agents, self.manifest
        expected: dict[Stage, tuple[str | None, str | None]] = {
            Stage.SCOPE: (manifest.scope.agent_id, manifest.scope.digest),
            Stage.QUERY: (manifest.query.agent_id, manifest.query.digest),
        }
        if manifest.mediator is not None:
            expected[Stage.MEDIATOR] = (manifest.mediator.agent_id, manifest.mediator.digest)
        if set(agents) != set(expected):
            raise RunFailed("agent_missing")
        for stage, (agent_id, digest) in expected.items():
            agent = agents[stage]
            if agent.stage is not stage:
                raise RunFailed("agent_mismatch")
            # An uploadable room pins no query agent; the worker resolved and verified it.
            if agent_id is not None and (agent.agent_id, agent.source_digest) != (agent_id, digest):
                raise RunFailed("agent_mismatch")

    def _prepare_agents(self) -> None:
        for stage in ORDER:
            agent = self.inputs.agents.get(stage)
            if agent is None:
                continue
            prepared = self.pipeline.images.get(agent.source_dir, agent.source_digest)
            if prepared.source_digest != agent.source_digest:
                raise RunFailed("source_digest_mismatch")
            self.prepared[stage] = prepared
            self.receipt_agents.append(
                ReceiptAgent(
                    stage=stage,
                    agent_id=agent.agent_id,
                    source_digest=agent.source_digest,
                    image_digest=prepared.image_digest,
                )
            )

    def _scoped_limits(self) -> ScopedLimits:
        """The data engine's limits for this run: its databases and SQLite item copies are files of
        the run's own tmpfs workspace (never TMPDIR), wiped with it."""
        if self.config.scoped.workspace is not None:
            return self.config.scoped
        directory = self.inputs.workspace / "databases"
        directory.mkdir(mode=0o700, exist_ok=True)
        return self.config.scoped.model_copy(update={"workspace": directory})

    def _scoped_items(self) -> list[ScopedItem]:
        items = []
        for item in self.inputs.items:
            try:
                info = ItemInfo(
                    id=item.item_id,
                    name=item.name,
                    content_type=item.content_type,
                    size=item.path.stat().st_size,
                    metadata=dict(item.metadata),
                )
            except (ValidationError, OSError):
                raise RunFailed("data_invalid") from None
            items.append(ScopedItem.from_path(info, item.path))
        return items

    # --- running one sandboxed stage ---

    def _time_left(self) -> int:
        return int(self.deadline - time.monotonic())

    def _stage_timeout(self, stage: Stage) -> int:
        left = self._time_left()
        if left < 1:
            raise RunFailed(f"{stage.value}_timeout")
        return left

    def _begin(self, stage: Stage) -> None:
        try:
            self.on_stage(stage)
        except BaseException as exc:
            raise _CallbackFailed(exc) from None

    def _session(self, sandbox: _StageSandbox, services: StageServices, *, simulated: bool) -> StageSession:
        return StageSession(
            run_id=self.inputs.run_id,
            stage=sandbox.stage,
            services=services,
            chain=self.pipeline.chain,
            limits=self.config.bridge,
            simulated=simulated,
            token=sandbox.token,
        )

    def _prestart(self) -> None:
        """Start every stage's sandbox now, so each stage finds its agent started and waiting for its
        session: container start-up overlaps the data loading and the stages before it."""
        if not self.config.prestart:
            return
        for stage in ORDER:
            if stage in self.prepared:
                timeout = self._stage_timeout(stage)
                self.prestarted[stage] = _StageSandbox(
                    self, stage, name=stage.value, timeout_s=timeout
                ).start()

    def _sandbox(
        self, stage: Stage, services: StageServices, timeout_s: int, *, cancel: threading.Event
    ) -> _StageRun:
        """Run one simulation's sandbox to its end on the calling thread."""
        return self._fresh_sandbox(
            stage, services, timeout_s, name=f"{stage.value}-simulation", simulated=True, cancel=cancel
        ).stage_run()

    def _fresh_sandbox(
        self,
        stage: Stage,
        services: StageServices,
        timeout_s: int,
        *,
        name: str,
        simulated: bool,
        settle: Callable[[], None] = lambda: None,
        release: Callable[[], None] = lambda: None,
        cancel: threading.Event | None = None,
    ) -> _StageSandbox:
        """A sandbox whose session is served before its agent starts (nothing waits in its socket)."""
        sandbox = _StageSandbox(self, stage, name=name, timeout_s=timeout_s)
        session = self._session(sandbox, services, simulated=simulated)
        sandbox.attach(session, settle=settle, release=release, cancel=cancel)
        return sandbox.start()

    def _launch(
        self,
        stage: Stage,
        services: StageServices,
        timeout_s: int,
        *,
        settle: Callable[[], None],
        release: Callable[[], None],
    ) -> _StageSandbox:
        """Serve the stage's session to its pre-started sandbox, or to a fresh one when there is none
        (or it ended, or waited too long); the run joins every sandbox before it ends."""
        prestarted = self.prestarted.pop(stage, None)
        try:
            if (
                prestarted is not None
                and prestarted.waited_s() <= self.config.prestart_max_wait_s
                and prestarted.attach(
                    self._session(prestarted, services, simulated=False), settle=settle, release=release
                )
            ):
                self.live.append(prestarted)
                return prestarted
            sandbox = self._fresh_sandbox(
                stage, services, timeout_s, name=stage.value, simulated=False, settle=settle, release=release
            )
        except BaseException:
            release()
            raise
        finally:
            if prestarted is not None and prestarted not in self.live:
                prestarted.discard()
                self.unused.append(prestarted)
        self.live.append(sandbox)
        return sandbox

    def _await_answer(self, sandbox: _StageSandbox) -> StageOutput:
        """The stage's answer as soon as it is posted (its sandbox winds down meanwhile), or RunFailed.

        Without a posted output the run waits for the sandbox's end: its outcome names the failure.
        """
        output = sandbox.answer()
        self.phases.lap(sandbox.stage.value)
        if output is None:
            return stage_answer(sandbox.stage, None, sandbox.join().outcome)
        # A posted output decides the stage whatever the sandbox's outcome (see stage_answer).
        return stage_answer(sandbox.stage, output, Outcome.OK)

    def _record(self, stage: Stage, result: SandboxResult, name: str, session: StageSession | None) -> None:
        """Keep the sandbox's logs, output and failure text with the run's diagnostics (inside the TEE);
        ``session`` is None for a pre-started sandbox no stage used."""
        output = session.output if session is not None else None
        record = {
            "stage": stage.value,
            "outcome": result.outcome.value,
            "exit_code": result.exit_code,
            "duration_ms": result.duration_ms,
            "logs": session.logs if session is not None else [],
            "failure": None
            if output is None or not output.failed
            else {"code": output.error_code, "message": output.error_message},
            "stdout": result.stdout.decode("utf-8", "replace"),
            "stderr": result.stderr.decode("utf-8", "replace"),
        }
        try:
            self.diagnostics.mkdir(mode=0o700, parents=True, exist_ok=True)
            descriptor = os.open(
                self.diagnostics / f"{name}.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600
            )
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                json.dump(record, handle, ensure_ascii=False)
        except OSError as exc:
            logger.warning("diagnostics of run %s not written: %s", self.inputs.run_id, type(exc).__name__)

    def _account(self, stage: Stage, runs: list[_StageRun]) -> None:
        """The stage's usage: its wall-clock time (``runs[0]``; simulations ran inside it), and the
        tool and LLM calls of all ``runs``."""
        tool_calls: dict[str, int] = {}
        for run in runs:
            for tool, count in run.session.tool_counts.items():
                tool_calls[tool] = tool_calls.get(tool, 0) + count
        llm = self.meter.stage_usage(stage)
        self.usage[stage] = StageUsage(
            stage=stage,
            duration_ms=runs[0].result.duration_ms,
            tool_calls=tool_calls,
            llm_calls=llm.calls,
            prompt_tokens=llm.prompt_tokens,
            completion_tokens=llm.completion_tokens,
        )

    def _run_stage(
        self,
        stage: Stage,
        services: StageServices,
        timeout_s: int,
        *,
        release: Callable[[], None] = lambda: None,
    ) -> StageOutput:
        return self._await_answer(
            self._launch(stage, services, timeout_s, settle=lambda: None, release=release)
        )

    def _input(
        self, role: Stage, *, prompt: str | None, schema: Any, timeout_s: int, **rest: Any
    ) -> dict[str, Any]:
        return {
            "role": role.value,
            "prompt": prompt,
            "rules": self.manifest.rules,
            "policy": self.manifest.policy,
            "schema": schema,
            "budgets": _budget_view(self.inputs.budgets, timeout_s, self.meter),
            "llm_providers": list(self.manifest.egress.llm_providers),
            **rest,
        }

    # --- scope ---

    @property
    def prompt_visible_to_scope(self) -> bool:
        """The scope agent sees the prompt only when its source is inspectable: a participant can read
        what it does with the prompt before accepting the room (docs/bridge.md, "Prompt visibility")."""
        return self.manifest.scope.visibility is Visibility.INSPECTABLE

    def _query_agent_view(self) -> dict[str, Any]:
        agent = self.inputs.agents[Stage.QUERY]
        files: dict[str, str] | None = None
        if agent.visibility is Visibility.INSPECTABLE:
            files = self._inspectable_files(agent)
        return {
            "agent_id": agent.agent_id,
            "digest": agent.source_digest,
            "visibility": agent.visibility.value,
            "files": files,
        }

    def _inspectable_files(self, agent: StageAgent) -> dict[str, str]:
        """The query agent's text files, each checked against the file list whose digest is the pinned
        source digest, so the scope stage reads exactly the source that runs."""
        manifest = validate_archive(pack_directory(agent.source_dir))
        if manifest.digest != agent.source_digest:
            raise RunFailed("source_digest_mismatch")
        files: dict[str, str] = {}
        budget = self.config.max_inspectable_bytes
        for entry in manifest.files:
            if entry.size > budget:
                continue
            content = (agent.source_dir / entry.path).read_bytes()
            if hashlib.sha256(content).hexdigest() != entry.sha256:
                raise RunFailed("source_digest_mismatch")
            try:
                files[entry.path] = content.decode("utf-8")
            except UnicodeDecodeError:
                continue  # binary files are not shown; their digests are part of the source digest
            budget -= entry.size
        return files

    def _scope_stage(self) -> ScopePolicy:
        self._begin(Stage.SCOPE)
        self._stage_timeout(Stage.SCOPE)  # a stage without time left fails before loading anything
        try:
            database = full_read_database(self.items, self.scoped)
        except DataLoadError as exc:
            raise RunFailed(exc.code) from None
        self.phases.lap("scope_load")
        data_policy = self.manifest.data_policy
        scope_finished = threading.Event()

        def drain_simulations() -> None:
            # Simulations still running are stopped, and waited for so their usage is counted.
            scope_finished.set()
            with self.simulation_state:
                self.simulation_state.wait_for(
                    lambda: self.active_simulations == 0, timeout=_SIMULATION_DRAIN_S
                )

        try:
            timeout = self._stage_timeout(Stage.SCOPE)  # what is left once the data is loaded
            schema = database.schema(role=Stage.SCOPE)
            services = StageServices(
                input_document=self._input(
                    Stage.SCOPE,
                    prompt=self.inputs.prompt if self.prompt_visible_to_scope else None,
                    schema=schema.model_dump(mode="json"),
                    timeout_s=timeout,
                    artifacts_allowed=False,
                    stage={
                        "prompt_visible": self.prompt_visible_to_scope,
                        "data_policy": None if data_policy is None else data_policy.model_dump(mode="json"),
                        "query_agent": self._query_agent_view(),
                    },
                ),
                database=database,
                llm=self.meter,
                llm_allowed=bool(self.manifest.egress.llm_providers),
                simulator=self._simulator(scope_finished),
                policy_checker=room_policy_checker(
                    {table.name: [column.name for column in table.columns] for table in schema.tables},
                    data_policy,
                ),
            )
        except BaseException:
            database.close()
            raise
        live = self._launch(Stage.SCOPE, services, timeout, settle=drain_simulations, release=database.close)
        try:
            output = self._await_answer(live)
        finally:
            # The stage is over: no simulation starts any more (running ones are stopped).
            scope_finished.set()
        if output.kind != "json" or output.data is None:
            raise RunFailed("scope_policy_invalid")
        try:
            policy = resolve_policy(output.data, data_policy)
        except InvalidPolicy:
            raise RunFailed("scope_policy_invalid") from None
        self.policy_digest = policy_hash(policy)
        return policy

    def _simulator(
        self, scope_finished: threading.Event
    ) -> Callable[[Mapping[str, Any], str], dict[str, Any]]:
        def simulate(candidate: Mapping[str, Any], prompt: str) -> dict[str, Any]:
            policy = resolve_policy(candidate, self.manifest.data_policy)  # InvalidPolicy: 400 invalid_policy
            with self.simulation_state:
                if scope_finished.is_set():
                    raise StageFinished("the scope stage has ended")
                if self.simulations >= self.config.max_simulations:
                    raise SimulationLimit(f"a run may simulate at most {self.config.max_simulations} times")
                self.simulations += 1
                self.active_simulations += 1
                number = self.simulations
            try:
                return self._simulate(policy, prompt, number, scope_finished)
            finally:
                with self.simulation_state:
                    self.active_simulations -= 1
                    self.simulation_state.notify_all()

        return simulate

    def _simulate(
        self, policy: ScopePolicy, prompt: str, number: int, scope_finished: threading.Event
    ) -> dict[str, Any]:
        """Run the query agent once in a fresh sandbox on a database built for ``policy``."""
        timeout = min(self.config.simulation_timeout_s, self._time_left() - 1)
        if timeout < 1:
            return {
                "output": None,
                "error": {"code": "timeout", "message": "the scope stage has no time left"},
            }
        try:
            database = build_scoped_database(self.items, policy, self.scoped)
        except DataLoadError as exc:
            return {"output": None, "error": {"code": exc.code, "message": exc.message}}
        with database, tempfile.TemporaryDirectory(dir=self.inputs.workspace) as scratch:
            services = self._query_services(policy_database=database, prompt=prompt, timeout_s=timeout)
            # Simulated artifacts are kept apart and discarded with the scratch directory.
            artifacts = ArtifactStore(Path(scratch) / "artifacts", self.config.bridge)
            services = replace(
                services, artifacts=artifacts if services.artifacts_allowed else None, bill_to=Stage.SCOPE
            )
            run = self._sandbox(Stage.QUERY, services, timeout, cancel=scope_finished)
        self._record(Stage.QUERY, run.result, f"scope-simulation-{number}", run.session)
        with self.simulation_state:
            self.simulation_runs.append(run)
        return self._simulation_answer(run)

    @staticmethod
    def _simulation_answer(run: _StageRun) -> dict[str, Any]:
        output = run.session.output
        if output is not None and not output.failed:
            return {"output": _answer_value(output), "error": None}
        if output is not None:
            return {
                "output": None,
                "error": {"code": output.error_code, "message": output.error_message or ""},
            }
        messages = {
            Outcome.TIMEOUT: ("timeout", "the query agent did not answer in time"),
            Outcome.OOM: ("out_of_memory", "the query agent ran out of memory"),
        }
        code, message = messages.get(
            run.result.outcome, ("failed", "the query agent exited without an output")
        )
        return {"output": None, "error": {"code": code, "message": message}}

    # --- query ---

    def _query_services(
        self, *, policy_database: ScopedDatabase, prompt: str, timeout_s: int
    ) -> StageServices:
        allowed = self.manifest.egress.artifacts
        return StageServices(
            input_document=self._input(
                Stage.QUERY,
                prompt=prompt,
                schema=policy_database.schema(role=Stage.QUERY).model_dump(mode="json"),
                timeout_s=timeout_s,
                artifacts_allowed=allowed,
                stage={},
            ),
            database=policy_database,
            llm=self.meter,
            llm_allowed=bool(self.manifest.egress.llm_providers),
            artifacts_allowed=allowed,
        )

    def _query_stage(self, policy: ScopePolicy) -> StageOutput:
        self._begin(Stage.QUERY)
        self._stage_timeout(Stage.QUERY)
        try:
            database = build_scoped_database(self.items, policy, self.scoped)
        except InvalidPolicy:
            # The policy names tables or columns the data does not have: fail closed, and no policy
            # was used.
            self.policy_digest = None
            raise RunFailed("scope_policy_invalid") from None
        except DataLoadError as exc:
            raise RunFailed(exc.code) from None
        self.phases.lap("query_load")
        try:
            timeout = self._stage_timeout(Stage.QUERY)
            services = self._query_services(
                policy_database=database, prompt=self.inputs.prompt, timeout_s=timeout
            )
            if services.artifacts_allowed:
                self.artifact_store = ArtifactStore(self.inputs.workspace / "artifacts", self.config.bridge)
                services = replace(services, artifacts=self.artifact_store)
        except BaseException:
            database.close()
            raise
        # The database stays open until the stage's sandbox has ended (its thread closes it).
        return self._run_stage(Stage.QUERY, services, timeout, release=database.close)

    # --- mediator ---

    def _mediator_stage(self, policy: ScopePolicy, answer: StageOutput) -> StageOutput:
        self._begin(Stage.MEDIATOR)
        timeout = self._stage_timeout(Stage.MEDIATOR)
        self.phases.lap("mediator_load")
        services = StageServices(
            input_document=self._input(
                Stage.MEDIATOR,
                prompt=self.inputs.prompt,
                schema=None,
                timeout_s=timeout,
                artifacts_allowed=False,
                stage={
                    "answer": answer.answer(),
                    "output_rules": {"deny": list(policy.output.deny), "redact": list(policy.output.redact)},
                },
            ),
            llm=self.meter,
            llm_allowed=bool(self.manifest.egress.llm_providers),
        )
        return self._run_stage(Stage.MEDIATOR, services, timeout)


# --- the last gate -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GatedOutput:
    """What may leave the runner: the final answer's bytes, its content type, the artifacts' paths."""

    output: bytes
    content_type: str
    artifacts: dict[str, Path]


def gate_output(
    policy: ScopePolicy, final: StageOutput, artifacts: Mapping[str, StoredArtifact] | None = None
) -> GatedOutput:
    """Apply the policy's ``output.deny`` and ``output.redact`` to the final answer and the artifacts.

    Raises :class:`RunFailed` with ``output_denied`` when a deny pattern matches the answer (text, or any
    key, string or number of a JSON answer, or its serialization) or a text artifact, and with
    ``artifact_unverifiable`` for a binary artifact when the policy has output rules (bytes cannot be
    checked). Text artifacts are redacted in place.
    """
    rules = policy.output
    value = _answer_value(final)
    if isinstance(value, str):
        if rules.denied_by(value) is not None:
            raise RunFailed("output_denied")
        output, content_type = rules.redact_text(value).encode("utf-8"), TEXT_CONTENT_TYPE
    else:
        if rules.denied_by(_serialize(value)) is not None or any(
            rules.denied_by(leaf) is not None for leaf in _json_leaves(value)
        ):
            raise RunFailed("output_denied")
        output = _serialize(_redact_json(value, rules.redact_text)).encode("utf-8")
        content_type = JSON_CONTENT_TYPE
    gated: dict[str, Path] = {}
    for name, artifact in sorted((artifacts or {}).items()):
        data = artifact.path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            if rules.deny or rules.redact:
                raise RunFailed("artifact_unverifiable") from None
            gated[name] = artifact.path
            continue
        if rules.denied_by(text) is not None:
            raise RunFailed("output_denied")
        redacted = rules.redact_text(text)
        if redacted != text:
            artifact.path.write_bytes(redacted.encode("utf-8"))
        gated[name] = artifact.path
    return GatedOutput(output=output, content_type=content_type, artifacts=gated)
