"""Where SQLite puts the scratch data of big sorts, groupings and DISTINCTs: memory, or a tmpfs directory.

A ``GROUP BY`` over a table without a fitting index sorts every row it reads: SQLite's sorter holds
them in its working memory and writes the overflow to temporary files. With ``temp_store = MEMORY``
those "files" are heap too, so a grouping query over a large projection costs the runner several
times the projection's size in its own memory. :func:`spill_to` lets the runner send that overflow
to a RAM-backed directory instead: SQLite unlinks each temporary file as soon as it opens it, so
nothing is left by name and nothing reaches a disk, and the runner's heap keeps only the sorter's
bounded working set.

SQLite's temporary directory is one setting for the whole process, and must be set before other
threads use SQLite: the runner sets it once at start-up (``python -m hivemind_runner``). Until then,
and whenever the directory is not RAM-backed, databases keep their scratch data in memory: never on
a disk.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
from pathlib import Path

RAM_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})


class _Setting:
    """The process's one spill directory (SQLite's own setting is process-wide too)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.directory: Path | None = None


_SETTING = _Setting()


def filesystem_type(path: Path) -> str | None:
    """The type of the filesystem ``path`` is on (from ``/proc/self/mountinfo``), or None if unknown."""
    target = os.path.realpath(path)
    best: tuple[int, str] | None = None
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        before, _, after = line.partition(" - ")
        fields = before.split()
        if len(fields) < 5 or not after:
            continue
        mount_point = fields[4].encode().decode("unicode_escape")
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and (best is None or len(mount_point) > best[0]):
            best = (len(mount_point), after.split()[0])
    return None if best is None else best[1]


def spill_to(directory: Path) -> bool:
    """Send SQLite's temporary files to ``directory`` (created 0700) if it is RAM-backed.

    Returns whether it is now in use; a directory on any other filesystem is refused (room data must
    not reach a disk) and databases keep their scratch data in memory. Call once, at start-up,
    before other threads use SQLite.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        return False
    if stat.S_IMODE(info.st_mode) != 0o700:
        directory.chmod(0o700)
    if filesystem_type(directory) not in RAM_FILESYSTEMS:
        return False
    quoted = str(directory).replace("'", "''")
    with _SETTING.lock:
        connection = sqlite3.connect(":memory:")
        try:
            # Deprecated in SQLite's documentation but supported; the only way to choose the directory
            # from Python (SQLITE_TMPDIR is read once, by whichever connection first needs a file).
            connection.execute(f"PRAGMA temp_store_directory = '{quoted}'")
        finally:
            connection.close()
        _SETTING.directory = directory
    return True


def temp_store() -> str:
    """The ``temp_store`` for a stage database: ``FILE`` once :func:`spill_to` succeeded, else
    ``MEMORY``."""
    with _SETTING.lock:
        return "FILE" if _SETTING.directory is not None else "MEMORY"
