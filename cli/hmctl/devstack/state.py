"""Where the local stack keeps its state, and the record of what it started.

The state directory (``$HMCTL_STATE_DIR``, else ``$XDG_STATE_HOME/hmctl/dev``, else
``~/.local/state/hmctl/dev``; mode 0700) holds:

- ``stack.json`` (0600): the :class:`StackRecord` of the running stack: coordinates, and every process
  it started (pid and kernel start time, see :mod:`hmctl.devstack.processes`);
- ``logs/<process>.log`` (0600): each process's output, kept after ``dev down`` for debugging;
- ``runner-seed`` (0600): the simulated runner's key seed, written by the runner;
- ``lock``: held (``flock``) by ``up`` and ``down`` so two of them never interleave.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hmctl.devstack.processes import ProcessRecord
from hmctl.errors import CliError, ExitCode

STATE_DIR_ENV = "HMCTL_STATE_DIR"
STACK_FILE = "stack.json"
RECORD_VERSION = 1


class DevStackError(CliError):
    """The local stack cannot do what was asked; the message (or hint) says what to do."""

    code = "dev_stack_error"
    exit_code = ExitCode.ERROR


def state_dir() -> Path:
    """The state directory of the local stack (see the module docstring for the lookup order)."""
    explicit = os.environ.get(STATE_DIR_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "state"
    return base / "hmctl" / "dev"


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (0700) if needed; an existing directory others can enter is tightened."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)
    return path


class StackStatus(BaseModel):
    """``hmctl dev status --json``: exactly these keys (a stable contract for scripts)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    service_url: str
    aws_endpoint_url: str
    region: str
    bucket: str
    tables: dict[str, str]
    queues: dict[str, str]
    admin_profile: str
    runner_backend: str


class StackRecord(BaseModel):
    """What ``dev up`` started and where it listens. Written after every process it starts (so ``down``
    can stop an interrupted ``up``); ``status`` is set once the whole stack answers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = RECORD_VERSION
    status: StackStatus | None = None
    prefix: str
    runner_id: str
    started_at: int
    processes: tuple[ProcessRecord, ...] = Field(default_factory=tuple)


def write_private_json(path: Path, payload: str) -> None:
    """Write ``payload`` to ``path`` atomically, mode 0600."""
    partial = path.with_name(path.name + ".partial")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(payload)
    os.replace(partial, path)


def save_record(directory: Path, record: StackRecord) -> None:
    write_private_json(directory / STACK_FILE, record.model_dump_json(indent=2))


def load_record(directory: Path) -> StackRecord | None:
    """The recorded stack, or None when there is none. An unreadable record is an error (never guessed
    around: it names processes this tool may have to stop)."""
    path = directory / STACK_FILE
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw)
        if data.get("version") != RECORD_VERSION:
            raise DevStackError(
                f"{path} was written by another version of hmctl; stop that stack with it, "
                f"or remove the file if no such stack is running",
                code="dev_state_unreadable",
            )
        return StackRecord.model_validate(data)
    except (ValueError, ValidationError):
        raise DevStackError(
            f"{path} is not a stack record hmctl can read; remove it if no local stack is running",
            code="dev_state_unreadable",
        ) from None


def clear_record(directory: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (directory / STACK_FILE).unlink()


@contextlib.contextmanager
def exclusive_lock(directory: Path, *, wait_s: float = 30.0) -> Iterator[None]:
    """Hold the state directory's lock (one ``dev up``/``dev down`` at a time)."""
    ensure_private_dir(directory)
    descriptor = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    raise DevStackError(
                        f"another hmctl dev command holds {directory / 'lock'}; wait for it to finish",
                        code="dev_stack_busy",
                    ) from None
                time.sleep(0.1)
        yield
    finally:
        os.close(descriptor)
