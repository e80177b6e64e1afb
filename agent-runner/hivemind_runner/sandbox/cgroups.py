"""Per-run cgroups for the process backend: memory, pids and CPU limits, OOM counts, kill-all.

Supports cgroup v1 (a hierarchy per controller, as on this project's CI hosts) and cgroup v2 (one
unified hierarchy). A run's cgroup is created as a child of the runner's own cgroup in each hierarchy,
so whatever limits the runner itself lives under still apply. :func:`detect_cgroups` probes once by
creating and removing a cgroup; when it cannot (no root, no delegation, v2 controllers not enabled for
the runner's cgroup), the process backend falls back to rlimits and says so.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

_CPU_PERIOD_US = 100_000
_KILL_WAIT_S = 5.0


@dataclass(frozen=True)
class _Mount:
    point: Path
    root: str
    fstype: str
    options: frozenset[str]


def _mounts() -> list[_Mount]:
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        before, _, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        # mountinfo escapes spaces and the like as octal: \040
        point = fields[4].encode().decode("unicode_escape")
        mounts.append(_Mount(Path(point), fields[3], tail[0], frozenset(tail[2].split(","))))
    return mounts


def _own_cgroups() -> dict[str, str]:
    """``{controller: path}`` from /proc/self/cgroup; the v2 hierarchy is under the key ``""``."""
    paths: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    return paths


def _under_mount(mount: _Mount, path: str) -> Path | None:
    if mount.root == "/":
        return mount.point / path.lstrip("/")
    if path == mount.root or path.startswith(mount.root.rstrip("/") + "/"):
        return mount.point / path[len(mount.root) :].lstrip("/")
    return None


def _write(path: Path, value: str) -> None:
    path.write_text(value)


@dataclass(frozen=True)
class CgroupLayout:
    """Where per-run cgroups are created: v1 ``{controller: parent}`` or v2 ``{"": parent}``."""

    version: int
    parents: dict[str, Path]

    @property
    def description(self) -> str:
        """For operators and docs, e.g. ``cgroup v1 (cpu+memory+pids)``."""
        if self.version == 1:
            controllers = set(self.parents)
        else:
            enabled = set((self.parents[""] / "cgroup.subtree_control").read_text().split())
            controllers = enabled & {"cpu", "memory", "pids"}
        return f"cgroup v{self.version} ({'+'.join(sorted(controllers))})"

    def create(self, *, memory_bytes: int, pids: int, cpus: float) -> RunCgroup:
        name = f"hivemind-sandbox-{uuid.uuid4().hex}"
        directories = {controller: parent / name for controller, parent in self.parents.items()}
        run = RunCgroup(self.version, directories)
        try:
            for directory in directories.values():
                directory.mkdir(mode=0o755)
            run.apply_limits(memory_bytes=memory_bytes, pids=pids, cpus=cpus)
        except BaseException:
            run.destroy()
            raise
        return run


class RunCgroup:
    """One run's cgroup(s). ``procs_files`` are what the launcher writes itself into."""

    def __init__(self, version: int, directories: dict[str, Path]):
        self.version = version
        self.directories = directories

    @property
    def procs_files(self) -> list[str]:
        return [str(directory / "cgroup.procs") for directory in self.directories.values()]

    def apply_limits(self, *, memory_bytes: int, pids: int, cpus: float) -> None:
        quota = max(int(cpus * _CPU_PERIOD_US), 1000)
        if self.version == 1:
            memory = self.directories["memory"]
            _write(memory / "memory.limit_in_bytes", str(memory_bytes))
            if (memory / "memory.memsw.limit_in_bytes").exists():
                _write(memory / "memory.memsw.limit_in_bytes", str(memory_bytes))  # no swap either
            _write(self.directories["pids"] / "pids.max", str(pids))
            if "cpu" in self.directories:
                _write(self.directories["cpu"] / "cpu.cfs_period_us", str(_CPU_PERIOD_US))
                _write(self.directories["cpu"] / "cpu.cfs_quota_us", str(quota))
            return
        directory = self.directories[""]
        _write(directory / "memory.max", str(memory_bytes))
        if (directory / "memory.swap.max").exists():
            _write(directory / "memory.swap.max", "0")
        _write(directory / "pids.max", str(pids))
        if (directory / "cpu.max").exists():
            _write(directory / "cpu.max", f"{quota} {_CPU_PERIOD_US}")

    def oom_kills(self) -> int:
        """How many processes the memory limit killed in this cgroup."""
        if self.version == 1:
            source = self.directories["memory"] / "memory.oom_control"
        else:
            source = self.directories[""] / "memory.events"
        try:
            text = source.read_text()
        except OSError:
            return 0
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def _pids(self) -> set[int]:
        pids: set[int] = set()
        for procs in self.procs_files:
            with contextlib.suppress(OSError):
                pids.update(int(pid) for pid in Path(procs).read_text().split())
        return pids

    def kill_all(self) -> None:
        """SIGKILL every process still in the cgroup, until it is empty (or a few seconds passed)."""
        if self.version == 2:
            kill_file = self.directories[""] / "cgroup.kill"
            if kill_file.exists():
                with contextlib.suppress(OSError):
                    _write(kill_file, "1")
        deadline = time.monotonic() + _KILL_WAIT_S
        while (pids := self._pids()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)

    def destroy(self) -> None:
        """Kill what is left and remove the cgroup directories (retrying while the kernel reaps)."""
        self.kill_all()
        for directory in self.directories.values():
            deadline = time.monotonic() + _KILL_WAIT_S
            while directory.exists():
                try:
                    directory.rmdir()
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() >= deadline:
                        raise
                    time.sleep(0.01)


def _probe(layout: CgroupLayout) -> bool:
    try:
        run = layout.create(memory_bytes=64 * 1024 * 1024, pids=64, cpus=1.0)
    except OSError:
        return False
    try:
        run.destroy()
    except OSError:
        return False
    return True


def _detect_v1(mounts: list[_Mount], own: dict[str, str]) -> CgroupLayout | None:
    parents: dict[str, Path] = {}
    for controller in ("memory", "pids", "cpu"):
        for mount in mounts:
            if mount.fstype == "cgroup" and controller in mount.options and controller in own:
                parent = _under_mount(mount, own[controller])
                if parent is not None and parent.is_dir():
                    parents[controller] = parent
                break
    if "memory" not in parents or "pids" not in parents:
        return None
    layout = CgroupLayout(1, parents)
    if _probe(layout):
        return layout
    # CPU quota is a nice-to-have: keep memory and pids when only the cpu hierarchy is not writable.
    parents.pop("cpu", None)
    layout = CgroupLayout(1, parents)
    return layout if _probe(layout) else None


def _detect_v2(mounts: list[_Mount], own: dict[str, str]) -> CgroupLayout | None:
    if "" not in own:
        return None
    for mount in mounts:
        if mount.fstype != "cgroup2":
            continue
        parent = _under_mount(mount, own[""])
        if parent is None or not parent.is_dir():
            continue
        enabled = set((parent / "cgroup.subtree_control").read_text().split())
        if not {"memory", "pids"} <= enabled:
            # Enabling controllers for children fails (EBUSY) while the runner's own cgroup holds
            # processes, which is the common case; then the backend uses rlimits.
            try:
                _write(parent / "cgroup.subtree_control", "+memory +pids")
            except OSError:
                return None
        layout = CgroupLayout(2, {"": parent})
        return layout if _probe(layout) else None
    return None


def detect_cgroups() -> CgroupLayout | None:
    """A writable place for per-run cgroups with memory and pids controllers, or None."""
    try:
        mounts, own = _mounts(), _own_cgroups()
    except OSError:
        return None
    return _detect_v1(mounts, own) or _detect_v2(mounts, own)
