"""Process supervision for the local stack: start children in their own session, recognise them later
(from another ``hmctl`` invocation) and stop exactly them.

A pid alone is not an identity: after a crash and a reboot, or simply after enough time, another
program can get the same pid. A :class:`ProcessRecord` therefore keeps the pid together with the
kernel's start time of that process (``/proc/<pid>/stat`` field 22, in clock ticks since boot); a
record matches a live process only when both agree. Every child is started with ``start_new_session``,
so it leads its own process group: stopping it signals the group (the child and anything it forked)
and nothing else, and Ctrl-C in the terminal of ``hmctl dev up`` reaches only ``hmctl``, which then
stops the children in order.

Linux only (``/proc``), like the runner's sandboxes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

_PROC = Path("/proc")
# /proc/<pid>/stat fields after the command name, counted from field 3 (state).
_STATE = 0
_PGRP = 2
_STARTTIME = 19


class ProcessRecord(BaseModel):
    """One child of the local stack, as written to the state file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9-]{0,31}$")
    pid: int = Field(gt=1)
    start_ticks: int = Field(ge=0, description="/proc/<pid>/stat starttime: tells this process from a reuse")
    argv: tuple[str, ...]
    log: str


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` from the state on (the command name may hold spaces and parens)."""
    try:
        raw = (_PROC / str(pid) / "stat").read_text(encoding="utf-8", errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    _, _, rest = raw.rpartition(")")
    return rest.split()


def start_ticks_of(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None if there is no such process."""
    fields = _stat_fields(pid)
    if fields is None or len(fields) <= _STARTTIME:
        return None
    return int(fields[_STARTTIME])


def _alive(fields: list[str] | None) -> bool:
    # Z (zombie) and X (dead) have exited; only their parent's bookkeeping is left.
    return fields is not None and fields[_STATE] not in ("Z", "X")


def is_running(record: ProcessRecord) -> bool:
    """True only if the very process the record names is alive (same pid and same start time)."""
    fields = _stat_fields(record.pid)
    return _alive(fields) and fields is not None and int(fields[_STARTTIME]) == record.start_ticks


def group_members(pgid: int) -> list[int]:
    """Live processes in process group ``pgid`` (zombies excluded)."""
    members: list[int] = []
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if _alive(fields) and fields is not None and int(fields[_PGRP]) == pgid:
            members.append(int(entry.name))
    return members


def spawn(
    name: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    log_path: Path,
    cwd: Path | None = None,
) -> tuple[ProcessRecord, subprocess.Popen[bytes]]:
    """Start ``argv`` in a new session, stdout and stderr appended to ``log_path`` (created 0600)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        child = subprocess.Popen(  # noqa: S603 - argv is built by the stack from fixed module names
            list(argv),
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=descriptor,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    finally:
        os.close(descriptor)
    ticks = start_ticks_of(child.pid)
    if ticks is None:
        # It exited before we could look at it: still return a record, which simply never matches.
        ticks = 0
    record = ProcessRecord(name=name, pid=child.pid, start_ticks=ticks, argv=tuple(argv), log=str(log_path))
    return record, child


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def stop(
    record: ProcessRecord,
    *,
    grace_s: float = 10.0,
    kill_wait_s: float = 5.0,
    child: subprocess.Popen[bytes] | None = None,
) -> bool:
    """Stop the process ``record`` names and its process group: SIGTERM, then SIGKILL after ``grace_s``.

    Signals go to the group only while the recorded process (its leader) is verifiably ours, or while
    members of that group remain after it exited (a pgid is not reused while its group has members).
    ``child`` is the Popen handle when this process started it, so the exit is reaped, not left a zombie.
    Returns True when nothing of the group is left.
    """
    pgid = record.pid
    if not is_running(record):
        members = group_members(pgid)
        # A live process with the leader's pid that is not the recorded one means our group ended and
        # the pid was reused (the kernel reuses a pgid only once its group is empty): not ours to signal.
        if not members or pgid in members:
            _reap(child)
            return True
    _signal_group(pgid, signal.SIGTERM)
    if _wait_gone(pgid, record, grace_s, child):
        return True
    _signal_group(pgid, signal.SIGKILL)
    return _wait_gone(pgid, record, kill_wait_s, child)


def _reap(child: subprocess.Popen[bytes] | None) -> None:
    if child is not None:
        child.poll()


def _wait_gone(
    pgid: int, record: ProcessRecord, timeout_s: float, child: subprocess.Popen[bytes] | None
) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        _reap(child)
        if not is_running(record) and not group_members(pgid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file (empty if it does not exist)."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 64 * 1024))
            data = handle.read()
    except FileNotFoundError:
        return ""
    return "\n".join(data.decode("utf-8", errors="replace").splitlines()[-lines:])
