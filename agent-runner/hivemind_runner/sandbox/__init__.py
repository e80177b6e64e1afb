"""Agent sandboxes (DESIGN §8 "Sandbox", §16.10; docs/sandbox.md).

::

    backend = select_backend("auto")                       # docker if an engine answers, else process
    agent = backend.prepare(source_dir, source_digest)     # or AgentImageCache(backend).get(...)
    result = backend.run(SandboxSpec(agent=agent, role=Stage.QUERY, bridge_socket=sock,
                                     session_token=token, memory_mb=256, timeout_s=120))
    if result.outcome is not Outcome.OK: ...

The contract is in :mod:`hivemind_runner.sandbox.base`; the backends are
:class:`~hivemind_runner.sandbox.docker_backend.DockerBackend` and
:class:`~hivemind_runner.sandbox.process_backend.ProcessBackend`.
"""

from __future__ import annotations

from typing import Literal

from hivemind_runner.sandbox.base import (
    AGENT_BASE_IMAGE,
    AGENT_GID,
    AGENT_UID,
    CONTAINER_BRIDGE_PATH,
    AgentBuildError,
    Availability,
    DockerfileRefused,
    Outcome,
    PreparedAgent,
    SandboxBackend,
    SandboxError,
    SandboxResult,
    SandboxSpec,
    SandboxUnavailable,
    SourceDigestMismatch,
    create_bridge_socket_dir,
)
from hivemind_runner.sandbox.process_backend import ProcessBackend

BackendPreference = Literal["auto", "docker", "process"]

__all__ = [
    "AGENT_BASE_IMAGE",
    "AGENT_GID",
    "AGENT_UID",
    "CONTAINER_BRIDGE_PATH",
    "AgentBuildError",
    "Availability",
    "BackendPreference",
    "DockerfileRefused",
    "Outcome",
    "PreparedAgent",
    "ProcessBackend",
    "SandboxBackend",
    "SandboxError",
    "SandboxResult",
    "SandboxSpec",
    "SandboxUnavailable",
    "SourceDigestMismatch",
    "create_bridge_socket_dir",
    "select_backend",
]


def _make_backend(name: str) -> SandboxBackend:
    if name == "process":
        return ProcessBackend()
    # Imported on demand: a machine that runs the process backend needs no Docker SDK.
    from hivemind_runner.sandbox.docker_backend import DockerBackend  # noqa: PLC0415

    return DockerBackend()


def select_backend(preference: BackendPreference = "auto") -> SandboxBackend:
    """The sandbox backend to use, with default settings.

    ``auto``: Docker when an engine answers, else the process backend. ``docker`` / ``process``: that
    backend, or :class:`SandboxUnavailable` saying why it cannot work here. Construct
    ``DockerBackend(...)`` or ``ProcessBackend(...)`` directly for non-default settings.
    """
    if preference not in ("auto", "docker", "process"):
        raise ValueError(f"unknown sandbox backend {preference!r} (expected auto, docker or process)")
    reasons: list[tuple[str, str]] = []
    for name in ("docker", "process") if preference == "auto" else (preference,):
        try:
            backend = _make_backend(name)
        except ImportError as exc:
            reasons.append((name, f"the docker Python SDK is not installed ({exc})"))
            continue
        availability = backend.availability()
        if availability.available:
            return backend
        reasons.append((name, availability.reason))
    if preference == "auto":
        listed = "; ".join(f"{name}: {reason}" for name, reason in reasons)
        raise SandboxUnavailable(f"no sandbox backend works on this machine ({listed})")
    raise SandboxUnavailable(f"the {preference} sandbox backend is not available: {reasons[0][1]}")
