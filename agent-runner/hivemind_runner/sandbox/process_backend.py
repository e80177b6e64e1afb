"""The process sandbox backend: bubblewrap on a Debian rootfs, for machines without a Docker engine.

Same contract and same hostile tests as the Docker backend (docs/sandbox.md). The pieces:

- **Root filesystem**: the debootstrap tarball that ``agents/base/build-base-image.sh`` caches (Debian
  bookworm minbase + python3 + PyYAML), extracted once per tarball hash and adjusted the way the base
  image is (user 10001, SDK on ``sys.path`` through a ``.pth`` file, set-id bits stripped). Without a
  cached tarball the backend runs debootstrap itself when it can (root + debootstrap + a Debian mirror).
- **SDK**: the ``.py`` files of ``hivemind_agent`` copied once per content hash and bound read-only at
  ``/opt/hivemind/sdk/hivemind_agent``, where the base image has it.
- **Agent**: the Dockerfile subset of :func:`plan_process_agent` applied at prepare time into a
  directory bound read-only at ``/agent``; the command, working directory and ``ENV`` are recorded
  next to it.
- **Sandbox**: ``bwrap --unshare-all --unshare-user --disable-userns --die-with-parent --new-session
  --cap-drop ALL --uid 10001 --gid 10001 --clearenv``, the rootfs directories bound read-only on a
  tmpfs root that is then remounted read-only, fresh ``/proc`` and minimal ``/dev`` (read-only),
  a size-capped ``/tmp``, and the bridge socket at ``/run/hivemind/bridge.sock``. The new network
  namespace has no interface but a loopback that is down.
- **Limits**: a per-run cgroup (memory, pids, CPU quota) when the runner can create one, otherwise
  rlimits (``RLIMIT_AS`` for memory, ``RLIMIT_NPROC`` for processes); always ``RLIMIT_CPU``,
  ``RLIMIT_CORE`` = 0, ``RLIMIT_NOFILE``; the wall-clock timeout kills the whole process group and
  pid namespace.

When the runner is root, bubblewrap itself runs as uid 10001 (a tiny launcher joins the cgroup, sets
the rlimits and drops privileges before ``exec``), so the agent is uid 10001 inside and outside, as
in Docker. Bubblewrap resolves bind sources as that user, so the cache directory and the bridge
socket's directory must be reachable by uid 10001: see
:func:`~hivemind_runner.sandbox.base.create_bridge_socket_dir`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import platform
import resource
import select
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from hivemind.archive import extract_archive
from hivemind.canonical import canonical_sha256
from hivemind.models import Sha256Hex, StrictModel
from hivemind_runner.sandbox.base import (
    AGENT_GID,
    AGENT_UID,
    CONTAINER_BRIDGE_PATH,
    CONTAINER_TMP,
    Availability,
    DockerfileRefused,
    ImageDigest,
    Outcome,
    OutputCapture,
    PreparedAgent,
    SandboxError,
    SandboxResult,
    SandboxSpec,
    SandboxUnavailable,
    check_bridge_socket,
    classify,
    reachable_by_agent,
    verify_source,
)
from hivemind_runner.sandbox.cgroups import CgroupLayout, RunCgroup, detect_cgroups
from hivemind_runner.sandbox.dockerfile import AGENT_DIR, ProcessPlan, parse_dockerfile, plan_process_agent

_MIB = 1024 * 1024
_POLL_S = 0.05
_KILL_WAIT_S = 30
_READ_CHUNK = 64 * 1024
_SETUP_ERROR_BYTES = 4096
# The same suite and packages as agents/base/build-base-image.sh, so both find the same tarball.
ROOTFS_SUITE = "bookworm"
ROOTFS_PACKAGES = "python3,python3-yaml"
_ROOTFS_DIRS = ("etc", "opt", "usr", "var")
_SDK_MOUNT = "/opt/hivemind/sdk/hivemind_agent"
_ROOTFS_READY = ".hivemind-rootfs-ready"
_NOFILE = 1024
# Started as root (when the runner is root), with nothing but the standard library: read its plan from
# an fd, join the run's cgroup, set the rlimits, drop to the agent uid, become bubblewrap. A separate
# program instead of subprocess's preexec_fn, which is unsafe in a threaded runner. Plans and bubblewrap
# options travel in memfds, not argv, so the session token never shows in the host's process list.
_LAUNCHER = """\
import json, os, resource, sys
fd = int(sys.argv[1])
data = b""
while chunk := os.read(fd, 65536):
    data += chunk
os.close(fd)
plan = json.loads(data)
for path in plan["cgroup_procs"]:
    procs = os.open(path, os.O_WRONLY)
    os.write(procs, b"0")
    os.close(procs)
for which, soft, hard in plan["rlimits"]:
    resource.setrlimit(which, (soft, hard))
if plan["uid"] is not None:
    os.setgroups([])
    os.setgid(plan["gid"])
    os.setuid(plan["uid"])
os.execv(plan["argv"][0], plan["argv"])
"""
# Inside the sandbox: report "set up" on stdin (the write end of the start-marker pipe), then become the
# agent's command with stdin from /dev/null, as in Docker. dash cannot name fds above 9, hence fd 0.
_STARTER = 'printf started >&0 && exec "$@" </dev/null'


def default_cache_dir() -> Path:
    """Where build-base-image.sh caches the rootfs tarball (HIVEMIND_CACHE_DIR or the XDG cache)."""
    configured = os.environ.get("HIVEMIND_CACHE_DIR")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hivemind"


def default_state_dir() -> Path:
    """The backend's own cache. As root it must be reachable by uid 10001, so not under /root."""
    if os.geteuid() == 0:
        return Path("/var/cache/hivemind/process-sandbox")
    return default_cache_dir() / "process-sandbox"


def _run_tool(tool: str, *arguments: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a host tool found on PATH (tar, dpkg, debootstrap) without a shell; never raises on exit status."""
    executable = shutil.which(tool)
    if executable is None:
        raise SandboxUnavailable(f"{tool} is not installed")
    return subprocess.run(  # noqa: S603 - fixed tools, arguments built here, no shell
        [executable, *arguments], capture_output=True, text=True, timeout=timeout, check=False
    )


def _architecture() -> str:
    try:
        result = _run_tool("dpkg", "--print-architecture", timeout=10)
    except (OSError, subprocess.SubprocessError, SandboxUnavailable):
        result = None
    if result is not None and result.returncode == 0 and result.stdout.strip():
        return result.stdout.strip()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def default_rootfs_tarball() -> Path:
    """The tarball name build-base-image.sh uses: suite, variant, architecture, packages hash."""
    packages_hash = hashlib.sha256(f"{ROOTFS_PACKAGES}\n".encode()).hexdigest()[:12]
    return default_cache_dir() / f"debian-{ROOTFS_SUITE}-minbase-{_architecture()}-{packages_hash}.tar"


def _apt_mirror() -> str:
    """The Debian mirror apt already uses (deb822 or one-line sources), so no new host is contacted."""
    lines: list[str] = []
    for pattern in ("sources.list.d/*.sources", "sources.list", "sources.list.d/*.list"):
        for source in sorted(Path("/etc/apt").glob(pattern)):
            with contextlib.suppress(OSError):
                lines += source.read_text().splitlines()
    for line in lines:
        words = line.split()
        if words[:1] == ["URIs:"] or words[:1] == ["deb"]:
            for uri in words[1:]:
                if uri.startswith(("http://", "https://")) and uri.rstrip("/").endswith("/debian"):
                    return uri
    return "http://deb.debian.org/debian"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(_MIB):
            digest.update(chunk)
    return digest.hexdigest()


class ProcessAgentConfig(StrictModel):
    """What prepare() recorded about an agent: how to start it and what the receipt names."""

    source_digest: Sha256Hex
    image_digest: ImageDigest
    command: list[str] = Field(min_length=1)
    workdir: str
    env: dict[str, str]


@dataclass(frozen=True)
class _Rootfs:
    path: Path
    tarball_sha256: str


@dataclass(frozen=True)
class _Sdk:
    path: Path
    sha256: str


def _sdk_files(sdk_dir: Path) -> list[tuple[str, Path]]:
    files = [(path.relative_to(sdk_dir).as_posix(), path) for path in sdk_dir.rglob("*.py")]
    return sorted(files, key=lambda item: item[0].encode())


def sdk_sha256(sdk_dir: Path) -> str:
    """The SDK hash exactly as build-base-image.sh computes it (the base image's org.hivemind.sdk.sha256)."""
    listing = "".join(f"{_file_sha256(path)}  hivemind_agent/{name}\n" for name, path in _sdk_files(sdk_dir))
    return hashlib.sha256(listing.encode()).hexdigest()


def _locate_sdk() -> Path | None:
    spec = importlib.util.find_spec("hivemind_agent")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def _install_atomically(staging: Path, target: Path) -> None:
    """Move a fully written directory into place; a concurrent winner's copy is kept."""
    try:
        staging.rename(target)
    except OSError:
        if not target.exists():
            raise
        shutil.rmtree(staging, ignore_errors=True)


class ProcessBackend:
    """Agents under bubblewrap. Thread-safe: stages may run concurrently."""

    name = "process"

    def __init__(
        self,
        *,
        state_dir: Path | None = None,
        rootfs_tarball: Path | None = None,
        sdk_dir: Path | None = None,
        bwrap: str | None = None,
        use_cgroups: bool = True,
        debian_mirror: str | None = None,
    ):
        self.state_dir = state_dir or default_state_dir()
        self.rootfs_tarball = rootfs_tarball or default_rootfs_tarball()
        self.sdk_dir = sdk_dir or _locate_sdk()
        self._bwrap = bwrap or shutil.which("bwrap")
        self._use_cgroups = use_cgroups
        self._debian_mirror = debian_mirror or os.environ.get("HIVEMIND_DEBIAN_MIRROR")
        # Reentrant: availability() reports limits_mode, which probes cgroups under the same lock.
        self._lock = threading.RLock()
        self._digest_locks: dict[str, threading.Lock] = {}
        self._availability: Availability | None = None
        self._cgroups: CgroupLayout | None = None
        self._cgroups_probed = False
        self._rootfs_cache: _Rootfs | None = None
        self._sdk_cache: _Sdk | None = None

    # --- availability ---------------------------------------------------------------------------

    @property
    def limits_mode(self) -> str:
        """``cgroup v1 (cpu+memory+pids)``, ``cgroup v2 (...)`` or ``rlimits``: how limits are enforced."""
        layout = self._cgroup_layout()
        return layout.description if layout is not None else "rlimits"

    def _cgroup_layout(self) -> CgroupLayout | None:
        with self._lock:
            if not self._cgroups_probed:
                self._cgroups = detect_cgroups() if self._use_cgroups else None
                self._cgroups_probed = True
            return self._cgroups

    def availability(self) -> Availability:
        with self._lock:
            if self._availability is None:
                self._availability = self._check_availability()
            return self._availability

    def available(self) -> bool:
        return self.availability().available

    def _check_availability(self) -> Availability:
        reason = self._static_problem() or self._namespace_problem()
        if reason is not None:
            return Availability(False, reason)
        return Availability(True, f"bubblewrap {self._bwrap}, limits by {self.limits_mode}")

    def _static_problem(self) -> str | None:
        checks: list[tuple[Callable[[], bool], str]] = [
            (lambda: sys.platform == "linux", "the process backend needs Linux namespaces"),
            (
                lambda: self._bwrap is not None,
                "bubblewrap (bwrap) is not installed: apt-get install bubblewrap",
            ),
            (
                lambda: self.sdk_dir is not None and (self.sdk_dir / "__init__.py").is_file(),
                "the hivemind_agent SDK is not installed (pip install ./agents/sdk)",
            ),
            (
                self._rootfs_obtainable,
                f"no Debian rootfs: {self.rootfs_tarball} is missing and debootstrap cannot run here "
                "(needs root and the debootstrap package); build it with agents/base/build-base-image.sh",
            ),
            (
                self._state_dir_usable,
                f"cannot create {self.state_dir}, or uid {AGENT_UID} cannot traverse it",
            ),
        ]
        return next((reason for check, reason in checks if not check()), None)

    def _state_dir_usable(self) -> bool:
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        except OSError:
            return False
        return reachable_by_agent(self.state_dir / "x")

    def _namespace_problem(self) -> str | None:
        """Start one empty sandbox: hosts that forbid unprivileged user namespaces fail here."""
        if self._bwrap is None:
            return "bubblewrap (bwrap) is not installed"
        options = ["--unshare-all", "--unshare-user", "--disable-userns", "--ro-bind", "/", "/"]
        with _Launch(self._bwrap, options, ["/bin/true"], cgroup=None, rlimits=[]) as launch:
            result = subprocess.run(  # noqa: S603 - argv is built here, no shell
                launch.argv,
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
                cwd="/",
                pass_fds=launch.fds,
            )
        if result.returncode == 0:
            return None
        return (
            "bubblewrap cannot create namespaces here (unprivileged user namespaces disabled?): "
            + result.stderr.strip()[:300]
        )

    def _rootfs_obtainable(self) -> bool:
        if self.rootfs_tarball.is_file():
            return True
        return os.geteuid() == 0 and shutil.which("debootstrap") is not None

    # --- rootfs and SDK -------------------------------------------------------------------------

    def _rootfs(self) -> _Rootfs:
        with self._lock:
            if self._rootfs_cache is None:
                self._rootfs_cache = self._prepare_rootfs()
            return self._rootfs_cache

    def _prepare_rootfs(self) -> _Rootfs:
        if not self.rootfs_tarball.is_file():
            self._debootstrap_tarball()
        tarball_sha256 = _file_sha256(self.rootfs_tarball)
        target = self.state_dir / "rootfs" / tarball_sha256
        if (target / _ROOTFS_READY).is_file():
            return _Rootfs(target, tarball_sha256)
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        staging = Path(tempfile.mkdtemp(prefix="staging-", dir=target.parent))
        try:
            staging.chmod(0o755)
            owner = ["--numeric-owner", "--same-owner"] if os.geteuid() == 0 else ["--no-same-owner"]
            extracted = _run_tool(
                "tar",
                *owner,
                "-xpf",
                str(self.rootfs_tarball),
                "-C",
                str(staging),
                "--exclude=./dev/*",
                timeout=600,
            )
            if extracted.returncode != 0:
                raise SandboxUnavailable(f"cannot extract {self.rootfs_tarball}: {extracted.stderr[-500:]}")
            _adjust_rootfs(staging)
            (staging / _ROOTFS_READY).write_text(tarball_sha256 + "\n")
            _install_atomically(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return _Rootfs(target, tarball_sha256)

    def _debootstrap_tarball(self) -> None:
        """The offline-image recipe of build-base-image.sh, for hosts that have no Docker to run it."""
        if os.geteuid() != 0 or shutil.which("debootstrap") is None:
            raise SandboxUnavailable(f"{self.rootfs_tarball} is missing and debootstrap cannot run here")
        self.rootfs_tarball.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="rootfs-", dir=self.rootfs_tarball.parent))
        try:
            mirror = self._debian_mirror or _apt_mirror()
            built = _run_tool(
                "debootstrap",
                "--variant=minbase",
                f"--include={ROOTFS_PACKAGES}",
                ROOTFS_SUITE,
                str(work / "root"),
                mirror,
                timeout=1800,
            )
            if built.returncode != 0:
                raise SandboxUnavailable(f"debootstrap failed: {built.stdout[-800:]}{built.stderr[-800:]}")
            root = work / "root"
            for junk in (
                "var/cache/apt/archives",
                "var/lib/apt/lists",
                "usr/share/doc",
                "usr/share/man",
                "usr/share/info",
                "var/log",
            ):
                for entry in (root / junk).glob("*"):
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
            partial = self.rootfs_tarball.with_suffix(".tar.partial")
            packed = _run_tool(
                "tar", "--numeric-owner", "-C", str(root), "-cf", str(partial), ".", timeout=600
            )
            if packed.returncode != 0:
                raise SandboxUnavailable(f"cannot write {partial}: {packed.stderr[-500:]}")
            partial.rename(self.rootfs_tarball)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _sdk(self) -> _Sdk:
        with self._lock:
            if self._sdk_cache is None:
                self._sdk_cache = self._prepare_sdk()
            return self._sdk_cache

    def _prepare_sdk(self) -> _Sdk:
        if self.sdk_dir is None:
            raise SandboxUnavailable("the hivemind_agent SDK is not installed")
        digest = sdk_sha256(self.sdk_dir)
        target = self.state_dir / "sdk" / digest
        if target.is_dir():
            return _Sdk(target, digest)
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        staging = Path(tempfile.mkdtemp(prefix="staging-", dir=target.parent))
        try:
            staging.chmod(0o755)
            for name, path in _sdk_files(self.sdk_dir):
                destination = staging / name
                destination.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
                shutil.copyfile(path, destination)
                destination.chmod(0o644)
            if sdk_sha256(staging) != digest:
                raise SandboxError("the SDK changed while it was copied; try again")
            _install_atomically(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return _Sdk(target, digest)

    # --- prepare --------------------------------------------------------------------------------

    def _agents_dir(self) -> Path:
        return self.state_dir / "agents"

    def prepare(self, source_dir: Path, source_digest: str) -> PreparedAgent:
        if not self.available():
            raise SandboxUnavailable(f"the process backend is not available: {self.availability().reason}")
        verified = verify_source(source_dir, source_digest)
        plan = plan_process_agent(parse_dockerfile(verified.dockerfile))
        rootfs, sdk = self._rootfs(), self._sdk()
        # A content address over everything the agent runs on; documented in docs/sandbox.md.
        image_digest = "sha256:" + canonical_sha256(
            {
                "backend": self.name,
                "rootfs_tar_sha256": rootfs.tarball_sha256,
                "sdk_sha256": sdk.sha256,
                "source_digest": source_digest,
            }
        )
        target = self._agents_dir() / source_digest
        with self._digest_lock(source_digest):
            config = self._load_config(target)
            if config is None or config.image_digest != image_digest:
                self._build_agent_dir(verified.packed, plan, target, source_digest, image_digest)
        return PreparedAgent(
            backend=self.name, source_digest=source_digest, image_digest=image_digest, reference=str(target)
        )

    def _digest_lock(self, digest: str) -> threading.Lock:
        with self._lock:
            return self._digest_locks.setdefault(digest, threading.Lock())

    @staticmethod
    def _load_config(target: Path) -> ProcessAgentConfig | None:
        try:
            return ProcessAgentConfig.model_validate_json((target / "config.json").read_bytes())
        except (OSError, ValueError):
            return None

    def _build_agent_dir(
        self, packed: bytes, plan: ProcessPlan, target: Path, source_digest: str, image_digest: str
    ) -> None:
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        staging = Path(tempfile.mkdtemp(prefix="staging-", dir=target.parent))
        try:
            staging.chmod(0o755)
            source = staging / "source"
            extract_archive(packed, source)
            agent = staging / "agent"
            agent.mkdir(mode=0o755)
            for step in plan.copies:
                _apply_copy(source, agent, step.source, step.destination, into=step.into)
            if plan.workdir != CONTAINER_TMP:
                (agent / plan.workdir[len(AGENT_DIR) :].lstrip("/")).mkdir(parents=True, exist_ok=True)
            for directory in [agent, *(path for path in agent.rglob("*") if path.is_dir())]:
                directory.chmod(0o755)
            shutil.rmtree(source)
            config = ProcessAgentConfig(
                source_digest=source_digest,
                image_digest=image_digest,
                command=plan.command,
                workdir=plan.workdir,
                env=plan.env,
            )
            (staging / "config.json").write_text(config.model_dump_json())
            if target.exists():
                shutil.rmtree(target)
            _install_atomically(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    # --- run ------------------------------------------------------------------------------------

    def _rlimits(self, spec: SandboxSpec, *, cgroup: RunCgroup | None) -> list[tuple[int, int, int]]:
        cpu = spec.cpu_seconds_limit
        limits = [
            (resource.RLIMIT_CORE, 0, 0),
            (resource.RLIMIT_NOFILE, _NOFILE, _NOFILE),
            (resource.RLIMIT_CPU, cpu, cpu + 1),
        ]
        if cgroup is None:
            memory = spec.memory_mb * _MIB
            # RLIMIT_NPROC counts every process of the uid on the host, so the budget is added to
            # what that uid runs now (bubblewrap's own two processes included).
            uid = AGENT_UID if os.geteuid() == 0 else os.getuid()
            processes = _count_processes(uid) + spec.pids_limit + 2
            limits += [(resource.RLIMIT_AS, memory, memory), (resource.RLIMIT_NPROC, processes, processes)]
        return limits

    def _bwrap_options(self, spec: SandboxSpec, config: ProcessAgentConfig, agent_dir: Path) -> list[str]:
        rootfs, sdk = self._rootfs(), self._sdk()
        options = [
            "--unshare-all",
            "--unshare-user",
            "--disable-userns",
            "--die-with-parent",
            "--new-session",
            "--uid",
            str(AGENT_UID),
            "--gid",
            str(AGENT_GID),
            "--cap-drop",
            "ALL",
            "--hostname",
            "agent",
            "--clearenv",
        ]
        for key, value in sorted({**config.env, **spec.environment()}.items()):
            options += ["--setenv", key, value]
        for entry in sorted(rootfs.path.iterdir()):
            if entry.is_symlink():
                options += ["--symlink", os.readlink(entry), f"/{entry.name}"]
            elif entry.name in _ROOTFS_DIRS and entry.is_dir():
                options += ["--ro-bind", str(entry), f"/{entry.name}"]
        options += ["--ro-bind", str(sdk.path), _SDK_MOUNT]
        options += ["--ro-bind", str(agent_dir), AGENT_DIR]
        options += ["--proc", "/proc", "--dev", "/dev"]
        options += ["--size", str(spec.tmpfs_mb * _MIB), "--perms", "1777", "--tmpfs", CONTAINER_TMP]
        options += ["--bind", str(spec.bridge_socket), CONTAINER_BRIDGE_PATH]
        options += ["--remount-ro", "/dev", "--remount-ro", "/"]
        options += ["--chdir", config.workdir]
        return options

    def _prepared(self, agent: PreparedAgent) -> tuple[Path, ProcessAgentConfig]:
        if agent.backend != self.name:
            raise SandboxError(f"this agent was prepared by the {agent.backend} backend, not process")
        target = Path(agent.reference)
        if target.parent != self._agents_dir() or target.name != agent.source_digest:
            raise SandboxError(f"{target} is not a prepared agent of this backend")
        config = self._load_config(target)
        if config is None or config.image_digest != agent.image_digest:
            raise SandboxError(f"the prepared agent in {target} is gone or changed; prepare it again")
        return target / "agent", config

    def run(self, spec: SandboxSpec, *, stop: threading.Event | None = None) -> SandboxResult:
        agent_dir, config = self._prepared(spec.agent)
        check_bridge_socket(spec.bridge_socket)
        if not reachable_by_agent(spec.bridge_socket):
            raise SandboxError(
                f"uid {AGENT_UID} cannot reach {spec.bridge_socket}; create its directory with "
                "create_bridge_socket_dir()"
            )
        if self._bwrap is None:
            raise SandboxUnavailable("bubblewrap (bwrap) is not installed")
        with contextlib.ExitStack() as cleanup:
            layout = self._cgroup_layout()
            cgroup = None
            if layout is not None:
                cgroup = layout.create(
                    memory_bytes=spec.memory_mb * _MIB, pids=spec.pids_limit, cpus=spec.cpus
                )
                cleanup.callback(cgroup.destroy)
            # Two pipes from the sandbox: bubblewrap's --info-fd names the sandbox's init (whose exit
            # means the whole pid namespace is gone), and the start marker says setup succeeded.
            info_read, info_write = _closing_pipe(cleanup)
            marker_read, marker_write = _closing_pipe(cleanup)
            launch = cleanup.enter_context(
                _Launch(
                    self._bwrap,
                    [*self._bwrap_options(spec, config, agent_dir), "--info-fd", str(info_write.fd)],
                    ["/bin/sh", "-c", _STARTER, "hivemind-start", *config.command],
                    cgroup=cgroup,
                    rlimits=self._rlimits(spec, cgroup=cgroup),
                )
            )
            process = cleanup.enter_context(
                _spawn(launch.argv, (*launch.fds, info_write.fd), stdin=marker_write.fd)
            )
            # The parent's copies go now, so EOF on each pipe means the sandbox side closed it.
            launch.close()
            info_write.close()
            marker_write.close()
            return self._supervise(
                process, spec, stop, cgroup, info_read=info_read.fd, marker_read=marker_read.fd
            )

    def _supervise(
        self,
        process: subprocess.Popen[bytes],
        spec: SandboxSpec,
        stop: threading.Event | None,
        cgroup: RunCgroup | None,
        *,
        info_read: int,
        marker_read: int,
    ) -> SandboxResult:
        capture = OutputCapture(spec.max_output_bytes)
        init = _SandboxInit(info_read)
        started = time.monotonic()
        try:
            killed_for = _pump_and_watch(process, capture, init, started + spec.timeout_s, stop)
            if killed_for is not None:
                _kill(process, cgroup)
            try:
                returncode = process.wait(timeout=_KILL_WAIT_S)
            except subprocess.TimeoutExpired:
                raise SandboxError("the sandbox did not die after SIGKILL") from None
            ended = time.monotonic()
            if not init.wait_gone(_KILL_WAIT_S):
                raise SandboxError("the sandbox's pid namespace did not go away after SIGKILL")
        finally:
            init.close()
        if cgroup is not None:
            cgroup.kill_all()  # nothing should be left: the pid namespace is gone
        if killed_for is None and not _read_marker(marker_read):
            # bubblewrap failed before the agent started: the runner's problem, not the agent's.
            raise SandboxError(
                "the sandbox could not be set up: "
                + bytes(capture.stderr[-_SETUP_ERROR_BYTES:]).decode("utf-8", "replace").strip()
            )
        exit_code = returncode if returncode >= 0 else 128 - returncode
        oom = cgroup is not None and cgroup.oom_kills() > 0
        return SandboxResult(
            outcome=classify(exit_code, killed_for=killed_for, oom=oom),
            exit_code=exit_code,
            started_at=started,
            duration_ms=int((ended - started) * 1000),
            stdout=bytes(capture.stdout),
            stderr=bytes(capture.stderr),
            backend=self.name,
            source_digest=spec.agent.source_digest,
            image_digest=spec.agent.image_digest,
        )


class _Fd:
    """An fd closed exactly once: closing a number twice could close another thread's new fd."""

    def __init__(self, fd: int):
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


def _closing_pipe(cleanup: contextlib.ExitStack) -> tuple[_Fd, _Fd]:
    """A pipe whose ends are closed when ``cleanup`` unwinds, unless closed before."""
    ends = tuple(_Fd(fd) for fd in os.pipe())
    for end in ends:
        cleanup.callback(end.close)
    return ends[0], ends[1]


def _read_marker(fd: int) -> bool:
    os.set_blocking(fd, False)
    try:
        return bool(os.read(fd, 16))
    except BlockingIOError:
        return False


class _SandboxInit:
    """bubblewrap's init, pid 1 of the sandbox's pid namespace, learnt from ``--info-fd``.

    The kernel kills every process of the namespace when its init dies, and the init is fully gone
    only once they all are; so waiting on the init (through a pidfd, immune to pid reuse) is waiting
    for the whole sandbox, with or without a cgroup.
    """

    def __init__(self, info_fd: int):
        self.info_fd = info_fd
        self._info = bytearray()
        self._pidfd: int | None = None

    def feed(self) -> bool:
        """Read what bubblewrap wrote; at EOF open a pidfd on the init. False once the pipe is done."""
        try:
            data = os.read(self.info_fd, _READ_CHUNK)
        except BlockingIOError:
            return True
        if data and len(self._info) < _SETUP_ERROR_BYTES:
            self._info += data
            return True
        with contextlib.suppress(ValueError, KeyError, TypeError, OSError):
            self._pidfd = os.pidfd_open(int(json.loads(self._info)["child-pid"]))
        return False

    def wait_gone(self, timeout_s: float) -> bool:
        if self._pidfd is None:
            return True  # the init never started (or was already reaped when its pid was read)
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        return bool(poller.poll(int(timeout_s * 1000)))

    def close(self) -> None:
        if self._pidfd is not None:
            pidfd, self._pidfd = self._pidfd, None
            os.close(pidfd)


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


class _Launch:
    """The launcher command line and the two memfds it needs: its plan, and bubblewrap's options."""

    def __init__(
        self,
        bwrap: str,
        options: list[str],
        command: list[str],
        *,
        cgroup: RunCgroup | None,
        rlimits: list[tuple[int, int, int]],
    ):
        self._fds: list[int] = []
        options_fd = _memfd("hivemind-bwrap-args", b"".join(item.encode() + b"\0" for item in options))
        self._fds.append(options_fd)
        plan = {
            "cgroup_procs": cgroup.procs_files if cgroup is not None else [],
            "rlimits": rlimits,
            "uid": AGENT_UID if os.geteuid() == 0 else None,
            "gid": AGENT_GID if os.geteuid() == 0 else None,
            "argv": [bwrap, "--args", str(options_fd), "--", *command],
        }
        plan_fd = _memfd("hivemind-launch", json.dumps(plan).encode())
        self._fds.append(plan_fd)
        self.argv = [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(plan_fd)]

    @property
    def fds(self) -> tuple[int, ...]:
        return tuple(self._fds)

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.pop())

    def __enter__(self) -> _Launch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@contextlib.contextmanager
def _spawn(argv: list[str], fds: tuple[int, ...], *, stdin: int) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(  # noqa: S603 - argv is built here, no shell
        argv,
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=fds,
        cwd="/",
        env={"LANG": "C.UTF-8"},
        start_new_session=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            _kill(process, None)
            process.wait()
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()


def _kill(process: subprocess.Popen[bytes], cgroup: RunCgroup | None) -> None:
    """SIGKILL bubblewrap's process group (its sandbox dies with it) and everything in the cgroup."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    if cgroup is not None:
        cgroup.kill_all()


def _drain_ready(selector: selectors.BaseSelector, capture: OutputCapture, init: _SandboxInit) -> bool:
    """Read what is ready; unregister pipes at EOF. False once the output cap is passed."""
    for key, _ in selector.select(_POLL_S):
        if key.data == "info":
            if not init.feed():
                selector.unregister(key.fd)
            continue
        try:
            data = os.read(key.fd, _READ_CHUNK)
        except BlockingIOError:
            continue
        if not data:
            selector.unregister(key.fd)
        elif not capture.add(key.data, data):
            return False
    return True


def _pump_and_watch(
    process: subprocess.Popen[bytes],
    capture: OutputCapture,
    init: _SandboxInit,
    deadline: float,
    stop: threading.Event | None,
) -> Outcome | None:
    """Read stdout/stderr (and bubblewrap's info) until the sandbox ends; return why it must be killed."""
    if process.stdout is None or process.stderr is None:
        raise SandboxError("the sandbox was started without output pipes")
    with selectors.DefaultSelector() as selector:
        for name, fd in (
            ("stdout", process.stdout.fileno()),
            ("stderr", process.stderr.fileno()),
            ("info", init.info_fd),
        ):
            os.set_blocking(fd, False)
            selector.register(fd, selectors.EVENT_READ, name)
        while True:
            if not selector.get_map():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=_POLL_S)
            elif not _drain_ready(selector, capture, init):
                return Outcome.OUTPUT_TRUNCATED
            if not selector.get_map() and process.poll() is not None:
                return None
            if stop is not None and stop.is_set():
                return Outcome.STOPPED
            if time.monotonic() >= deadline:
                return Outcome.TIMEOUT


def _count_processes(uid: int) -> int:
    count = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if entry.stat().st_uid == uid:
                count += 1
    return count


def _apply_copy(source_root: Path, agent_root: Path, source: str, destination: str, *, into: bool) -> None:
    """Docker's COPY rules, within /agent: a directory's contents are merged, a file is placed."""
    if any(char in source for char in "*?"):
        origins = sorted(source_root.glob(source))
        if not origins:
            raise DockerfileRefused(f"COPY {source}: no file of the agent matches")
        if len(origins) > 1 and not into:
            raise DockerfileRefused(f"COPY {source}: several files match, so the destination must end with /")
    else:
        origins = [source_root / source if source else source_root]
        if not origins[0].exists():
            raise DockerfileRefused(f"COPY source {source!r} is not in the agent")
    relative = destination[len(AGENT_DIR) :].lstrip("/")
    for origin in origins:
        target = agent_root / relative if relative else agent_root
        if origin.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            shutil.copytree(origin, target, dirs_exist_ok=True)
            continue
        if into or target.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            target = target / origin.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(origin, target)


def _adjust_rootfs(root: Path) -> None:
    """Make the extracted rootfs match the agent base image (agents/base/Dockerfile)."""
    site = root / "usr/lib/python3/dist-packages"
    site.mkdir(parents=True, exist_ok=True)
    (site / "hivemind_agent.pth").write_text("/opt/hivemind/sdk\n")
    (root / _SDK_MOUNT.lstrip("/")).mkdir(parents=True, exist_ok=True, mode=0o755)
    with (root / "etc/passwd").open("a") as passwd:
        passwd.write(f"agent:x:{AGENT_UID}:{AGENT_GID}:hivemind agent:/agent:/usr/sbin/nologin\n")
    with (root / "etc/group").open("a") as group:
        group.write(f"agent:x:{AGENT_GID}:\n")
    for path in root.rglob("*"):
        with contextlib.suppress(OSError):
            info = path.lstat()
            if stat.S_ISREG(info.st_mode) and info.st_mode & (stat.S_ISUID | stat.S_ISGID):
                path.chmod(stat.S_IMODE(info.st_mode) & ~(stat.S_ISUID | stat.S_ISGID))
