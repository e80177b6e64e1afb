"""Per-run workspaces in memory: decrypted room items and agent sources live only here, only during a run.

Each run gets its own directory, mode 0700, on a RAM-backed filesystem:

- running as root (inside the CVM), a fresh ``tmpfs`` mount per run, capped in size, ``nosuid,nodev``;
  unmounting it at the end releases every page at once;
- otherwise a 0700 directory under ``/dev/shm`` (also tmpfs, shared with the host's other users but
  unreadable to them).

Plaintext never touches a disk. The workspace is wiped when the run ends, whatever happened, and
:meth:`WorkspaceFactory.sweep` removes what a killed runner left behind before new runs start. One
runner process owns its root directory (``<base>/<runner_id>``): run one process per runner id per host.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hivemind.errors import HivemindError

DEFAULT_BASE = Path("/dev/shm/hivemind-runner")  # noqa: S108 - RAM-backed on purpose; each run dir is 0700
_RUN_DIR = re.compile(r"^run_[a-z0-9]{1,64}$")


class WorkspaceError(HivemindError):
    code = "workspace_error"
    status = 500


@dataclass(frozen=True)
class RunWorkspace:
    """The directories of one run. ``items`` and ``agents`` are created empty."""

    root: Path
    mounted: bool

    @property
    def items(self) -> Path:
        return self.root / "items"

    @property
    def agents(self) -> Path:
        return self.root / "agents"

    @property
    def scratch(self) -> Path:
        """For transient files of the runner itself (sealed outputs on their way to the bucket)."""
        return self.root / "scratch"


def _find_program(name: str) -> str | None:
    for directory in ("/usr/bin", "/bin", "/usr/sbin", "/sbin"):
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


class WorkspaceFactory:
    """Creates, wipes and sweeps the run workspaces under ``root``."""

    def __init__(self, root: Path, *, mount_tmpfs: bool | None = None, size_mb: int = 2048) -> None:
        if size_mb < 16:
            raise ValueError("a run workspace needs at least 16 MiB")
        self.root = root
        self._size_mb = size_mb
        self._mount = _find_program("mount")
        self._umount = _find_program("umount")
        can_mount = os.geteuid() == 0 and self._mount is not None and self._umount is not None
        self._mount_tmpfs = can_mount if mount_tmpfs is None else (mount_tmpfs and can_mount)

    @property
    def mounts_tmpfs(self) -> bool:
        return self._mount_tmpfs

    def _prepare_root(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = self.root.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            raise WorkspaceError(f"workspace root {self.root} is not a directory owned by this user")
        if stat.S_IMODE(info.st_mode) != 0o700:
            self.root.chmod(0o700)

    @contextlib.contextmanager
    def open(self, run_id: str) -> Iterator[RunWorkspace]:
        """A fresh workspace for ``run_id``, wiped on exit (also when the run raised)."""
        if not _RUN_DIR.fullmatch(run_id):
            raise WorkspaceError("a workspace is named after a run id")
        self._prepare_root()
        path = self.root / run_id
        # A leftover of an earlier attempt of the same run (killed runner) is wiped, never reused.
        self._wipe(path)
        path.mkdir(mode=0o700)
        mounted = False
        try:
            if self._mount_tmpfs:
                mounted = self._mount_at(path)
            path.chmod(0o700)
            workspace = RunWorkspace(root=path, mounted=mounted)
            for directory in (workspace.items, workspace.agents, workspace.scratch):
                directory.mkdir(mode=0o700)
            yield workspace
        finally:
            self._wipe(path)

    def sweep(self) -> int:
        """Wipe every workspace left under the root (a runner killed mid-run); returns how many."""
        if not self.root.is_dir():
            return 0
        removed = 0
        for entry in sorted(self.root.iterdir()):
            if _RUN_DIR.fullmatch(entry.name):
                self._wipe(entry)
                removed += 1
        return removed

    def _mount_at(self, path: Path) -> bool:
        options = f"size={self._size_mb}m,mode=0700,nosuid,nodev"
        result = subprocess.run(  # noqa: S603 - fixed program and arguments, no shell
            [str(self._mount), "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
            capture_output=True,
            check=False,
            timeout=30,
        )
        # Without the capability (a container without SYS_ADMIN) the 0700 directory on /dev/shm stays.
        return result.returncode == 0

    def _is_mount_point(self, path: Path) -> bool:
        try:
            return path.is_mount()
        except OSError:
            return False

    def _wipe(self, path: Path) -> None:
        if not path.exists() and not path.is_symlink():
            return
        if path.is_symlink() or not path.is_dir():
            path.unlink()
            return
        if self._is_mount_point(path) and self._umount is not None:
            # Unmounting a tmpfs frees its pages; anything still open by a dead process goes with it.
            subprocess.run(  # noqa: S603 - fixed program and arguments, no shell
                [str(self._umount), "-l", str(path)], capture_output=True, check=False, timeout=30
            )
        shutil.rmtree(path, ignore_errors=True)
        if path.exists():
            raise WorkspaceError(f"workspace {path.name} could not be wiped")
