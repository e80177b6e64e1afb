"""The sandbox contract, proved the same way on both backends (docs/sandbox.md, DESIGN §16.10).

Every hostile probe runs as the agent (uid 10001, through the real SDK) and must be contained and
reported as a clear failure, with the runner process unharmed.
"""

from __future__ import annotations

import os
import resource
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hivemind_runner.sandbox import (
    CONTAINER_BRIDGE_PATH,
    Outcome,
    PreparedAgent,
    ProcessBackend,
    SandboxBackend,
    SandboxError,
    SandboxResult,
    SandboxSpec,
)
from hivemind_runner.sandbox.docker_backend import LABEL_SANDBOX, DockerBackend

BridgeFactory = Callable[..., Any]  # conftest.bridge_factory
RunSandbox = Callable[..., SandboxResult]  # conftest.run_sandbox

pytestmark = pytest.mark.slow


def leftover_sandboxes(backend: SandboxBackend) -> list[str]:
    """Containers or cgroups of finished sandboxes that are still there (there must be none)."""
    if isinstance(backend, DockerBackend):
        containers = backend._client().containers.list(all=True, filters={"label": LABEL_SANDBOX})
        return [container.id for container in containers]
    assert isinstance(backend, ProcessBackend)
    layout = backend._cgroup_layout()
    if layout is None:
        return []
    return [str(path) for parent in layout.parents.values() for path in parent.glob("hivemind-sandbox-*")]


def processes_with(marker: str) -> list[int]:
    """Host processes whose command line contains ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_well_behaved_agent_answers_through_the_bridge(
    sandbox_backend: SandboxBackend, bridge_factory: BridgeFactory, run_sandbox: RunSandbox
) -> None:
    bridge = bridge_factory()
    result = run_sandbox(bridge)
    assert result.outcome is Outcome.OK, result.stderr
    assert result.exit_code == 0
    assert bridge.output == {"json": {"prompt": "how many orders?", "orders": 42, "uid": 10001, "gid": 10001}}
    assert bridge.unauthorized == 0
    assert result.backend == sandbox_backend.name
    assert result.image_digest.startswith("sha256:")
    assert 0 < result.duration_ms < 15_000
    assert "stdout" not in repr(result)  # room data stays out of reprs and logs
    assert leftover_sandboxes(sandbox_backend) == []


def test_no_network_at_all(bridge_factory: BridgeFactory, run_sandbox: RunSandbox) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    probe = f"""
import os, socket
def attempt(action):
    try:
        action()
        return "connected"
    except OSError as exc:
        return type(exc).__name__
def tcp(host, port):
    socket.create_connection((host, port), timeout=3).close()
def udp():
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.sendto(b"x", ("1.1.1.1", 53))
result = {{
    "internet": attempt(lambda: tcp("1.1.1.1", 53)),
    "host_port": attempt(lambda: tcp("127.0.0.1", {port})),
    "dns": attempt(lambda: socket.getaddrinfo("example.com", 443)),
    "udp": attempt(udp),
    "interfaces": sorted(line.split(":")[0].strip() for line in open("/proc/net/dev").readlines()[2:]),
}}
"""
    bridge = bridge_factory(probe=probe)
    try:
        result = run_sandbox(bridge)
        with pytest.raises(TimeoutError):
            listener.accept()  # nobody got through to the host's loopback
    finally:
        listener.close()
    assert result.outcome is Outcome.OK, result.stderr
    facts = bridge.output["json"]
    assert facts["internet"] != "connected"
    assert facts["host_port"] != "connected"
    assert facts["dns"] == "gaierror"
    assert facts["udp"] != "connected"
    assert facts["interfaces"] == ["lo"]  # loopback only (up on Docker, down on the process backend)


def test_writes_outside_tmp_fail_and_the_host_is_invisible(
    bridge_factory: BridgeFactory, run_sandbox: RunSandbox, tmp_path: Path
) -> None:
    marker = tmp_path / "host-secret"
    marker.write_text("host only")
    probe = f"""
import errno, os
written = {{}}
for path in ["/agent/x", "/x", "/etc/x", "/usr/x", "/opt/hivemind/x", "/var/tmp/x", "/run/hivemind/x",
             "/dev/shm/x", "/proc/sys/kernel/hostname"]:
    try:
        with open(path, "w") as handle:
            handle.write("x")
        written[path] = "written"
    except OSError as exc:
        written[path] = errno.errorcode.get(exc.errno, str(exc.errno))
with open("/tmp/ok", "w") as handle:
    handle.write("fine")
try:
    with open("/tmp/big", "wb") as handle:
        for _ in range(16):
            handle.write(b"x" * (1 << 20))
    tmp_cap = "not enforced"
except OSError as exc:
    tmp_cap = errno.errorcode.get(exc.errno, str(exc.errno))
os.remove("/tmp/big")
result = {{
    "tmp_cap": tmp_cap,
    "written": written,
    "tmp": open("/tmp/ok").read(),
    "host_file_visible": os.path.exists({str(marker)!r}),
    "work_visible": os.path.exists("/work"),
    "run_hivemind": os.listdir("/run/hivemind"),
    "uid": [os.getuid(), os.geteuid(), os.getgid()],
    "caps": open("/proc/self/status").read().split("CapEff:")[1].split()[0],
    "no_new_privs": open("/proc/self/status").read().split("NoNewPrivs:")[1].split()[0],
}}
"""
    bridge = bridge_factory(probe=probe)
    result = run_sandbox(bridge, tmpfs_mb=8)
    assert result.outcome is Outcome.OK, result.stderr
    facts = bridge.output["json"]
    assert set(facts["written"].values()) <= {"EROFS", "EACCES", "ENOENT"}, facts["written"]
    assert facts["tmp"] == "fine"
    assert facts["tmp_cap"] == "ENOSPC"  # /tmp is an 8 MiB tmpfs here
    assert facts["host_file_visible"] is False
    assert facts["work_visible"] is False
    assert facts["run_hivemind"] == ["bridge.sock"]
    assert facts["uid"] == [10001, 10001, 10001]
    assert int(facts["caps"], 16) == 0
    assert facts["no_new_privs"] == "1"


def test_another_runs_bridge_socket_is_not_reachable(
    sandbox_backend: SandboxBackend, bridge_factory: BridgeFactory, probe_agent: PreparedAgent
) -> None:
    probe = """
import os, socket, time
other = ctx.input.stage["other"] if "other" in ctx.input.stage else OTHER
try:
    client = socket.socket(socket.AF_UNIX)
    client.connect(other)
    reached = "connected"
except OSError as exc:
    reached = type(exc).__name__
time.sleep(1)  # overlap with the other sandbox
result = {"reached": reached, "run_hivemind": os.listdir("/run/hivemind"), "end": time.time()}
"""
    first = bridge_factory(probe="")
    second = bridge_factory(probe="")
    first.probe = f"OTHER = {str(second.path)!r}\n" + probe
    second.probe = f"OTHER = {str(first.path)!r}\n" + probe
    results = {}

    def run(name: str, bridge: object) -> None:
        spec = SandboxSpec(
            agent=probe_agent,
            role="query",
            bridge_socket=bridge.path,  # type: ignore[attr-defined]
            session_token=bridge.session,  # type: ignore[attr-defined]
            timeout_s=20,
        )
        results[name] = sandbox_backend.run(spec)

    threads = [
        threading.Thread(target=run, args=(name, bridge)) for name, bridge in (("a", first), ("b", second))
    ]
    started = time.time()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert {name: result.outcome for name, result in results.items()} == {"a": Outcome.OK, "b": Outcome.OK}
    for bridge in (first, second):
        facts = bridge.output["json"]
        assert facts["reached"] == "FileNotFoundError"
        assert facts["run_hivemind"] == ["bridge.sock"]
    # Both were alive at the same time: each slept 1 s, together they took well under 2 s more.
    assert abs(first.output["json"]["end"] - second.output["json"]["end"]) < 1.0
    assert time.time() - started < 20


def test_fork_bomb_hits_the_pids_limit_and_is_cleaned_up(
    bridge_factory: BridgeFactory, run_sandbox: RunSandbox
) -> None:
    marker = f"99{uuid.uuid4().int % 10**8}"
    probe = f"""
import os, sys
children = 0
try:
    while children < 5000:
        pid = os.fork()
        if pid == 0:
            os.execv("/bin/sleep", ["sleep", "{marker}"])
        children += 1
except OSError as exc:
    print("fork failed after", children, "children:", exc.errno, flush=True)
    os._exit(3)
os._exit(0)
"""
    started = time.monotonic()
    result = run_sandbox(bridge_factory(probe=probe), pids_limit=32)
    assert time.monotonic() - started < 15
    assert result.outcome is Outcome.FAILED
    assert result.exit_code == 3
    children = int(result.stdout.split(b"after ")[1].split()[0])
    assert 0 < children < 32
    assert b"children: 11" in result.stdout  # EAGAIN
    assert processes_with(marker) == []


def test_memory_blow_up_is_an_oom(
    sandbox_backend: SandboxBackend, bridge_factory: BridgeFactory, run_sandbox: RunSandbox
) -> None:
    probe = """
blocks = []
while True:
    blocks.append(b"\\x01" * (8 << 20))
"""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = run_sandbox(bridge_factory(probe=probe), memory_mb=64)
    if isinstance(sandbox_backend, ProcessBackend) and sandbox_backend.limits_mode == "rlimits":
        # Without a memory cgroup, RLIMIT_AS makes allocation fail inside: a MemoryError, exit 1.
        assert result.outcome is Outcome.FAILED
    else:
        assert result.outcome is Outcome.OOM
        assert result.exit_code == 137
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB


def test_sleeping_past_the_timeout_is_killed_on_time(
    bridge_factory: BridgeFactory, run_sandbox: RunSandbox
) -> None:
    marker = f"98{uuid.uuid4().int % 10**8}"
    probe = f"""
import os
os.execv("/bin/sleep", ["sleep", "{marker}"])
"""
    started = time.monotonic()
    result = run_sandbox(bridge_factory(probe=probe), timeout_s=2)
    elapsed = time.monotonic() - started
    assert result.outcome is Outcome.TIMEOUT
    assert 2.0 <= elapsed < 4.0
    assert 2000 <= result.duration_ms < 4000
    assert processes_with(marker) == []


def test_cpu_quota_is_enforced(
    sandbox_backend: SandboxBackend, bridge_factory: BridgeFactory, run_sandbox: RunSandbox
) -> None:
    if isinstance(sandbox_backend, ProcessBackend) and "cpu" not in sandbox_backend.limits_mode:
        pytest.skip(f"no CPU cgroup here ({sandbox_backend.limits_mode}): only RLIMIT_CPU applies")
    probe = """
import time
wall = time.monotonic()
while time.monotonic() - wall < 1.5:
    pass
result = {"cpu": time.process_time()}
"""
    bridge = bridge_factory(probe=probe)
    result = run_sandbox(bridge, cpus=0.25)
    assert result.outcome is Outcome.OK, result.stderr
    # Busy for 1.5 s of wall-clock time with a quarter of a CPU (plus interpreter start-up).
    assert bridge.output["json"]["cpu"] < 0.9


def test_an_agent_killed_by_a_signal_is_reported_as_killed(
    bridge_factory: BridgeFactory, run_sandbox: RunSandbox
) -> None:
    result = run_sandbox(bridge_factory(probe="import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n"))
    assert result.outcome is Outcome.KILLED
    assert result.exit_code == 128 + 11


def test_stop_event_kills_the_stage(bridge_factory: BridgeFactory, run_sandbox: RunSandbox) -> None:
    stop = threading.Event()
    timer = threading.Timer(0.5, stop.set)
    timer.start()
    started = time.monotonic()
    result = run_sandbox(bridge_factory(probe="import time\ntime.sleep(60)\n"), stop=stop)
    timer.cancel()
    assert result.outcome is Outcome.STOPPED
    assert time.monotonic() - started < 3


def test_huge_output_is_cut_at_the_cap(bridge_factory: BridgeFactory, run_sandbox: RunSandbox) -> None:
    probe = """
import os
chunk = b"x" * 65536
for _ in range(4096):  # 256 MiB
    os.write(1, chunk)
    os.write(2, chunk)
"""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    result = run_sandbox(bridge_factory(probe=probe), max_output_bytes=256 * 1024)
    assert result.outcome is Outcome.OUTPUT_TRUNCATED
    assert len(result.stdout) + len(result.stderr) == 256 * 1024
    assert set(result.stdout) <= {ord("x")}
    assert time.monotonic() - started < 10
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB


def test_prompt_never_in_env_or_argv(bridge_factory: BridgeFactory, run_sandbox: RunSandbox) -> None:
    prompt = f"PROMPT-{uuid.uuid4().hex}"
    probe = """
import os, time
prompt = ctx.prompt.encode()
command_lines = []
for pid in os.listdir("/proc"):
    if pid.isdigit():
        try:
            command_lines.append(open(f"/proc/{pid}/cmdline", "rb").read())
        except OSError:
            pass
time.sleep(1)  # the test scans the host meanwhile
result = {
    "prompt_in_env": prompt in open("/proc/self/environ", "rb").read(),
    "prompt_in_argv": any(prompt in line for line in command_lines),
    "processes": len(command_lines),
    "env": dict(os.environ),
}
"""
    bridge = bridge_factory(probe=probe, prompt=prompt)
    host_hits: list[int] = []

    def scan_host() -> None:
        time.sleep(0.6)
        host_hits.extend(processes_with(prompt) + processes_with(bridge.session))

    scanner = threading.Thread(target=scan_host)
    scanner.start()
    result = run_sandbox(bridge)
    scanner.join()
    assert result.outcome is Outcome.OK, result.stderr
    facts = bridge.output["json"]
    assert facts["prompt_in_env"] is False
    assert facts["prompt_in_argv"] is False
    assert facts["processes"] >= 1
    env = facts["env"]
    assert env["HIVEMIND_BRIDGE"] == CONTAINER_BRIDGE_PATH
    assert env["HIVEMIND_SESSION"] == bridge.session
    assert env["HIVEMIND_ROLE"] == "query"
    assert env["HOME"] == "/tmp"
    # The runner's variables, the base image's ENV, and what the engine or shell adds by itself.
    assert set(env) <= {
        "HIVEMIND_BRIDGE",
        "HIVEMIND_SESSION",
        "HIVEMIND_ROLE",
        "PATH",
        "HOME",
        "LANG",
        "PYTHONDONTWRITEBYTECODE",
        "PYTHONUNBUFFERED",
        "HOSTNAME",
        "PWD",
    }
    assert prompt not in repr(env)
    # Neither the prompt nor the session token shows in any host process's command line.
    assert host_hits == []


def test_missing_bridge_socket_is_a_runner_error(
    sandbox_backend: SandboxBackend, probe_agent: PreparedAgent, tmp_path: Path
) -> None:
    spec = SandboxSpec(
        agent=probe_agent, role="query", bridge_socket=tmp_path / "gone.sock", session_token="t", timeout_s=5
    )
    with pytest.raises(SandboxError, match="is not there"):
        sandbox_backend.run(spec)


def test_an_agent_prepared_by_the_other_backend_is_refused(
    sandbox_backend: SandboxBackend, probe_agent: PreparedAgent, bridge_factory: BridgeFactory
) -> None:
    bridge = bridge_factory()
    foreign = probe_agent.model_copy(
        update={"backend": "docker" if sandbox_backend.name == "process" else "process"}
    )
    spec = SandboxSpec(agent=foreign, role="query", bridge_socket=bridge.path, session_token="t", timeout_s=5)
    with pytest.raises(SandboxError, match="prepared by the"):
        sandbox_backend.run(spec)
