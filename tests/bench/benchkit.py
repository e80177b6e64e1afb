"""Shared pieces of the end-to-end benchmarks (``bench_e2e.py``, ``bench_scale.py``); not a benchmark.

- :class:`LocalStack`: ``hmctl dev up --background`` in a private state and configuration directory
  (so a developer's own stack and profiles are never touched), torn down on exit, with a way to restart
  its runner under other settings (concurrency, workspace size, another source tree) and to read the
  runner's structured log;
- :func:`create_room`: the owner and participant story through ``hmctl`` itself (signup, credit, room
  with the default agents and the sample rules, data, an invite, acceptance), as ``hmctl dev demo`` does;
- :func:`timed_ask`: one ask through the client library exactly as ``hmctl room ask`` runs it (verify
  the room and the runner, seal and submit, long-poll, download, decrypt and verify the receipt), with
  a wall-clock timestamp at each step;
- :func:`runner_timeline`: the runner's side of one run from its log (``run_started`` and the
  ``phase_ms`` of ``run_finished``);
- reporting: :class:`Spread` (min / median / max), the machine and its load, and
  :func:`replace_section`, which rewrites one generated block of ``docs/performance.md``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hivemind.models import Budgets
from hmctl.client import ApiClient
from hmctl.profiles import ProfileStore
from hmctl.rooms import check_room, room_access
from hmctl.runs import Expected, OutputKeyHolder, open_run_output, submit_run

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "performance.md"
AGENTS = REPO / "agents"
SAMPLE_RULES = AGENTS / "examples" / "sample-data" / "rules.md"
SAMPLE_DATA = AGENTS / "examples" / "sample-data" / "people.csv"
BASE_IMAGE = "hivemind/agent-base:local"
QUESTION = "average salary by department"
OWNER = "bench-owner"
PARTICIPANT = "bench-participant"
ADMIN = "bench-admin"
CREDIT_USD = "200"
_HMCTL = "import sys; from hmctl.main import app; sys.argv[0] = 'hmctl'; app()"
_RUNNER_START_S = 120.0
RUN_RATE_LIMIT_PER_MINUTE = 10_000


class BenchError(RuntimeError):
    """The benchmark could not measure what it set out to (a step of the story failed)."""


# --- statistics and reporting ------------------------------------------------------------------------


@dataclass(frozen=True)
class Spread:
    """Min, median and max of repeated measurements."""

    low: float
    median: float
    high: float
    count: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        samples = sorted(values)
        if not samples:
            raise ValueError("no samples")
        return cls(samples[0], statistics.median(samples), samples[-1], len(samples))

    def cells(self, scale: float = 1.0, digits: int = 2) -> list[str]:
        return [f"{value * scale:.{digits}f}" for value in (self.low, self.median, self.high)]


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def machine() -> dict[str, str]:
    """What the figures were measured on (the same facts the other sections of the page give)."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.0f} GiB"
                break
    except OSError:
        pass
    docker = subprocess.run(
        ["docker", "version", "--format", "{{.Server.Version}}"],
        capture_output=True,
        text=True,
        check=False,
    )
    return {
        "cpus": str(os.cpu_count()),
        "cpu": cpu,
        "memory": memory,
        "python": platform.python_version(),
        "docker": docker.stdout.strip() or "unavailable",
        "kernel": platform.release(),
    }


def machine_line(facts: Mapping[str, str], loads: Sequence[tuple[float, float, float]]) -> str:
    ones = [load[0] for load in loads]
    return (
        f"{facts['cpus']} vCPUs ({facts['cpu']}), {facts['memory']} RAM, kernel {facts['kernel']}, "
        f"Python {facts['python']}, Docker engine {facts['docker']}. Measured "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}; 1-minute load average during the run "
        f"{min(ones):.1f} to {max(ones):.1f} on {facts['cpus']} CPUs (other work shared the machine)."
    )


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def replace_section(name: str, body: str, doc: Path = DOC) -> None:
    """Replace the block between ``<!-- bench:NAME:begin -->`` and ``<!-- bench:NAME:end -->`` in ``doc``
    (appended at the end when the markers are missing); everything outside the markers is kept."""
    begin, end = f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"
    text = doc.read_text(encoding="utf-8") if doc.exists() else ""
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(text, encoding="utf-8")


# --- the local stack ---------------------------------------------------------------------------------


@dataclass
class _Runner:
    process: subprocess.Popen[bytes] | None  # None: the stack's own runner, started by hmctl dev up
    pid: int
    log: Path


class LocalStack:
    """The local stack of ``hmctl dev up``, private to one benchmark (state and profiles under ``root``).

    Use as a context manager: ``up`` on entry, every process it (or :meth:`restart_runner`) started is
    stopped on exit.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {key: value for key, value in os.environ.items() if not key.startswith("HMCTL_")}
        self.env.update(
            HMCTL_STATE_DIR=str(root / "state"),
            HMCTL_CONFIG_DIR=str(root / "config"),
            HMCTL_NO_INPUT="1",
            # One participant submits every ask of a benchmark, faster than a person would.
            HIVEMIND_RUN_RATE_LIMIT_PER_MINUTE=str(RUN_RATE_LIMIT_PER_MINUTE),
        )
        self.status: dict[str, Any] = {}
        self._runner: _Runner | None = None
        self._runner_env: dict[str, str] = {}
        self._pythonpath: str | None = None
        self._api: subprocess.Popen[bytes] | None = None

    # --- hmctl ---

    def hmctl(self, *args: str, timeout_s: float = 900) -> dict[str, Any]:
        """``hmctl ARGS`` (which must include ``--json``) in this stack's directories; its JSON output."""
        completed = subprocess.run(
            [sys.executable, "-c", _HMCTL, *args],
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout_s,
        )
        if completed.returncode != 0:
            what = " ".join(args[:3])
            raise BenchError(f"hmctl {what} failed ({completed.returncode}): {completed.stderr}")
        parsed = json.loads(completed.stdout)
        if not isinstance(parsed, dict):
            raise BenchError(f"hmctl {' '.join(args[:3])} printed {type(parsed).__name__}, not an object")
        return parsed

    def profiles(self) -> ProfileStore:
        return ProfileStore.from_environment(self.env)

    # --- up and down ---

    def __enter__(self) -> LocalStack:
        self.root.mkdir(parents=True, exist_ok=True)
        self.status = self.hmctl(
            "dev", "up", "--background", "--port", "0", "--admin-profile", ADMIN, "--json", timeout_s=600
        )
        record = json.loads((self.root / "state" / "stack.json").read_text(encoding="utf-8"))
        runner = next(proc for proc in record["processes"] if proc["name"] == "runner")
        self._runner = _Runner(process=None, pid=int(runner["pid"]), log=Path(runner["log"]))
        self._runner_env = _process_environment(self._runner.pid)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop_own_runner()
        if self._api is not None and self._api.poll() is None:
            self._api.send_signal(signal.SIGTERM)
            try:
                self._api.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._api.kill()
                self._api.wait(timeout=30)
        subprocess.run(
            [sys.executable, "-c", _HMCTL, "dev", "down", "--json"],
            env=self.env,
            capture_output=True,
            check=False,
            timeout=120,
        )

    @property
    def service_url(self) -> str:
        return str(self.status["service_url"])

    @property
    def runner_pid(self) -> int:
        assert self._runner is not None
        return self._runner.pid

    @property
    def runner_log(self) -> Path:
        assert self._runner is not None
        return self._runner.log

    # --- the control plane ---

    def restart_api(self, pythonpath: str) -> None:
        """Restart the stack's control plane (API, settle worker, janitor) on the same port with
        ``pythonpath`` first on its import path, for what-if comparisons of control-plane changes."""
        record = json.loads((self.root / "state" / "stack.json").read_text(encoding="utf-8"))
        api = next(proc for proc in record["processes"] if proc["name"] == "api")
        pid = int(api["pid"])
        env = _process_environment(pid)
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
        port = self.service_url.rsplit(":", 1)[1]
        argv[argv.index("--port") + 1] = port
        inherited = env.get("PYTHONPATH")
        env["PYTHONPATH"] = pythonpath + (os.pathsep + inherited if inherited else "")
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        with (self.root / "api-restarted.log").open("ab") as sink:
            self._api = subprocess.Popen(
                argv, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                with ApiClient(self.service_url, retries=0) as client:
                    client.get("/v1/healthz")
                return
            except Exception:  # not listening yet
                if self._api.poll() is not None or time.monotonic() > deadline:
                    raise BenchError("the restarted control plane did not answer") from None
                time.sleep(0.2)

    # --- the runner ---

    def runner_workspace(self) -> Path:
        """The directory under which the runner mounts each run's tmpfs workspace."""
        env = self._runner_env
        base = Path(env.get("HIVEMIND_RUNNER_WORKSPACE_DIR") or "/dev/shm/hivemind-runner")
        return base / env["HIVEMIND_RUNNER_ID"]

    def restart_runner(self, overrides: Mapping[str, str], *, pythonpath: str | None = None) -> None:
        """Stop the current runner and start ``python -m hivemind_runner`` with the stack runner's own
        environment plus ``overrides``. ``pythonpath`` (kept for later restarts) goes first on its import
        path: a runner from another source tree. Returns once the new runner has started serving."""
        assert self._runner is not None
        self._stop_runner()
        env = dict(self._runner_env)
        env.update(overrides)
        self._pythonpath = pythonpath or self._pythonpath
        if self._pythonpath:
            inherited = env.get("PYTHONPATH")
            env["PYTHONPATH"] = self._pythonpath + (os.pathsep + inherited if inherited else "")
        log = self.root / f"runner-{int(time.time() * 1000)}.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(
                [sys.executable, "-m", "hivemind_runner"],
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._runner = _Runner(process=process, pid=process.pid, log=log)
        deadline = time.monotonic() + _RUNNER_START_S
        while not any(event.get("event") == "runner_started" for event in read_events(log)):
            if process.poll() is not None:
                raise BenchError(f"the runner exited while starting; see {log}")
            if time.monotonic() > deadline:
                raise BenchError(f"the runner did not start within {_RUNNER_START_S:.0f} s; see {log}")
            time.sleep(0.1)

    def _stop_runner(self) -> None:
        assert self._runner is not None
        if self._runner.process is not None:
            self._stop_own_runner()
            return
        # The stack's own runner (a child of hmctl dev up): SIGTERM lets it deregister and drain.
        try:
            os.kill(self._runner.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 60
        while _alive(self._runner.pid) and time.monotonic() < deadline:
            time.sleep(0.1)

    def _stop_own_runner(self) -> None:
        if self._runner is None or self._runner.process is None:
            return
        process = self._runner.process
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _process_environment(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (entry.split(b"=", 1) for entry in raw.split(b"\0") if b"=" in entry)
    return {key.decode(): value.decode() for key, value in pairs}


def read_events(log: Path) -> list[dict[str, Any]]:
    """The runner's JSON log lines (other lines, from libraries, are skipped)."""
    events: list[dict[str, Any]] = []
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return events
    for line in text.splitlines():
        if line.startswith('{"ts"'):
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
    return events


# --- rooms -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentDirs:
    scope: Path = AGENTS / "default-scope"
    query: Path = AGENTS / "default-query"
    mediator: Path = AGENTS / "default-mediator"

    @classmethod
    def fresh_copies(cls, directory: Path, nonce: str) -> AgentDirs:
        """Copies of the default agents with one extra file each: new source digests, so the runner
        has no image for them (a cold start)."""
        copies = {}
        for role, source in vars(cls()).items():
            target = directory / f"{role}-{nonce}"
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            (target / "BENCH_NONCE").write_text(nonce + "\n", encoding="utf-8")
            copies[role] = target
        return cls(**copies)


@dataclass(frozen=True)
class BenchRoom:
    room_id: str
    link: str
    manifest_hash: str


def ensure_tenants(stack: LocalStack) -> None:
    """The owner (with credit to sponsor its invitees' runs) and the participant, once per stack."""
    store = stack.profiles()
    if not store.exists(OWNER):
        owner = stack.hmctl("signup", OWNER, "--service", stack.service_url, "--json")
        tenant = str(owner["tenant_id"])
        stack.hmctl("--profile", ADMIN, "admin", "billing", "grant", tenant, "--usd", CREDIT_USD, "--json")
    if not store.exists(PARTICIPANT):
        stack.hmctl("signup", PARTICIPANT, "--service", stack.service_url, "--json")


def create_room(
    stack: LocalStack,
    *,
    data: Path | None,
    agents: AgentDirs | None = None,
    name: str = "people",
    uses: int = 100_000,
) -> BenchRoom:
    """A room with the sample rules and the given (default) agents, ``data`` added (None: no item yet),
    shared with the participant, who accepted it."""
    ensure_tenants(stack)
    agents = agents or AgentDirs()
    created = stack.hmctl(
        "--profile", OWNER, "room", "create", str(agents.scope), "--name", name,
        "--rules-file", str(SAMPLE_RULES), "--query-agent", str(agents.query),
        "--mediator-agent", str(agents.mediator), "--no-llm", "--no-invite", "--json",
    )  # fmt: skip
    room_id = str(created["room_id"])
    if data is not None:
        stack.hmctl("--profile", OWNER, "room", "add-data", room_id, "--file", str(data), "--json")
    return share_room(stack, room_id, str(created["manifest_hash"]), uses=uses)


def share_room(stack: LocalStack, room_id: str, manifest_hash: str, *, uses: int) -> BenchRoom:
    shared = stack.hmctl(
        "--profile", OWNER, "room", "share", room_id, "--uses", str(uses), "--expires", "7d", "--json"
    )
    link = str(shared["link"])
    stack.hmctl("--profile", PARTICIPANT, "room", "accept", link, "--manifest-hash", manifest_hash, "--json")
    return BenchRoom(room_id=room_id, link=link, manifest_hash=manifest_hash)


# --- one ask ----------------------------------------------------------------------------------------


@dataclass
class AskTiming:
    """Wall-clock instants (``time.time()``) of one ask, as the client saw them."""

    run_id: str = ""
    status: str = ""
    output: str = ""
    begin: float = 0.0
    verified: float = 0.0  # room, acceptance and runner attestation checked
    submitted: float = 0.0  # the control plane answered the submission
    finished: float = 0.0  # the long poll returned a finished run
    delivered: float = 0.0  # output downloaded, decrypted, receipt verified

    @property
    def total(self) -> float:
        return self.delivered - self.begin


def timed_ask(
    store: ProfileStore, link: str, *, prompt: str = QUESTION, budgets: Budgets | None = None
) -> AskTiming:
    """One ask as ``hmctl room ask LINK PROMPT`` runs it, without the CLI process around it."""
    timing = AskTiming(begin=time.time())
    profile = store.load(PARTICIPANT)
    access = room_access(profile, link)
    with ApiClient.for_secret(access.service, access.secret) as api:
        checked = check_room(
            api,
            access,
            profile=profile,
            store=store,
            now=int(time.time()),
            skip_attestations=False,
            confirm_acceptance=lambda _fetched: False,
        )
        timing.verified = time.time()
        ticket = submit_run(
            api,
            checked,
            prompt,
            tenant_id=profile.tenant_id,
            budgets=budgets,
            query_agent_id=None,
            tickets=store.run_tickets(profile.name),
            now=int(time.time()),
        )
        timing.submitted = time.time()
        timing.run_id = ticket.run_id
        api.wait_for_run(ticket.run_id, timeout_s=1800)
        timing.finished = time.time()
        view = api.get(f"/v1/runs/{ticket.run_id}/output")
        outcome = open_run_output(
            api, view, expected=Expected.of_ticket(ticket), holder=OutputKeyHolder.querier(ticket)
        )
        timing.delivered = time.time()
    timing.status = outcome.status.value
    timing.output = (outcome.output or b"").decode("utf-8", "replace")
    return timing


def submit_only(store: ProfileStore, link: str, *, prompt: str = QUESTION) -> tuple[str, ApiClient, Any]:
    """Verify and submit one ask; returns the run id, its client and the ticket (for :func:`deliver`)."""
    profile = store.load(PARTICIPANT)
    access = room_access(profile, link)
    api = ApiClient.for_secret(access.service, access.secret)
    checked = check_room(
        api,
        access,
        profile=profile,
        store=store,
        now=int(time.time()),
        skip_attestations=False,
        confirm_acceptance=lambda _fetched: False,
    )
    ticket = submit_run(
        api,
        checked,
        prompt,
        tenant_id=profile.tenant_id,
        budgets=None,
        query_agent_id=None,
        tickets=store.run_tickets(profile.name),
        now=int(time.time()),
    )
    return ticket.run_id, api, ticket


def deliver(api: ApiClient, ticket: Any) -> str:
    """Wait for a submitted run, then download, decrypt and verify it; its status."""
    api.wait_for_run(ticket.run_id, timeout_s=1800)
    view = api.get(f"/v1/runs/{ticket.run_id}/output")
    outcome = open_run_output(
        api, view, expected=Expected.of_ticket(ticket), holder=OutputKeyHolder.querier(ticket)
    )
    return outcome.status.value


# --- the runner's side ------------------------------------------------------------------------------


@dataclass
class RunnerTimeline:
    """One run as the runner logged it: when it started (wall clock) and its contiguous phases."""

    started: float  # time.time() at the end of the "start" phase (the run_started log line)
    phases: dict[str, int] = field(default_factory=dict)
    stage_ms: dict[str, int] = field(default_factory=dict)
    status: str = ""

    def at(self, phase: str) -> float:
        """Wall-clock instant at which ``phase`` ended (phases after ``start`` are summed)."""
        elapsed = 0
        for name, milliseconds in self.phases.items():
            if name == "start":
                continue
            elapsed += milliseconds
            if name == phase:
                return self.started + elapsed / 1000
        raise KeyError(phase)

    def ms(self, *names: str) -> int:
        return sum(self.phases.get(name, 0) for name in names)


def runner_timeline(log: Path, run_id: str, *, wait_s: float = 30.0) -> RunnerTimeline | None:
    """The runner's timeline of ``run_id`` (its ``run_finished`` line is written just after the client
    may have seen the run finish, so this waits for it a little)."""
    deadline = time.monotonic() + wait_s
    while True:
        started: dict[str, Any] | None = None
        finished: dict[str, Any] | None = None
        for event in read_events(log):
            if event.get("run_id") != run_id:
                continue
            if event.get("event") == "run_started":
                started = event
            elif event.get("event") == "run_finished":
                finished = event
        if started is not None and finished is not None:
            return RunnerTimeline(
                started=float(started["ts"]),
                phases={str(k): int(v) for k, v in (finished.get("phase_ms") or {}).items()},
                stage_ms={str(k): int(v) for k, v in (finished.get("stage_ms") or {}).items()},
                status=str(finished.get("status")),
            )
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


# --- baseline ----------------------------------------------------------------------------------------


def bare_containers(count: int = 3) -> float:
    """Seconds for ``count`` sequential ``docker run --rm --network none BASE python3 -c pass``."""
    start = time.perf_counter()
    for _ in range(count):
        subprocess.run(
            ["docker", "run", "--rm", "--network", "none", BASE_IMAGE, "python3", "-c", "pass"],
            check=True,
            capture_output=True,
            timeout=120,
        )
    return time.perf_counter() - start


@contextmanager
def load_sampler(into: list[tuple[float, float, float]], interval_s: float = 5.0) -> Iterator[None]:
    """Sample the load average every ``interval_s`` while the block runs (for the report)."""
    stop = threading.Event()

    def sample() -> None:
        while True:
            into.append(load_average())
            if stop.wait(interval_s):
                return

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        into.append(load_average())
