"""Foreground ``hmctl dev up``: stream the processes' logs until Ctrl-C, or until one of them dies."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from hmctl.devstack import processes
from hmctl.devstack.state import StackRecord

Emit = Callable[[str, str], None]

_POLL_S = 0.2
_MAX_READ = 256 * 1024


class _Tail:
    """New complete lines of one log file since the last read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.offset = path.stat().st_size
        except FileNotFoundError:
            self.offset = 0
        self._partial = b""

    def lines(self) -> list[str]:
        try:
            with self.path.open("rb") as handle:
                handle.seek(self.offset)
                data = handle.read(_MAX_READ)
        except FileNotFoundError:
            return []
        self.offset += len(data)
        data = self._partial + data
        complete, _, self._partial = data.rpartition(b"\n")
        if not complete:
            return []
        return complete.decode("utf-8", errors="replace").split("\n")


def follow(record: StackRecord, emit: Emit, stop: threading.Event) -> str | None:
    """Emit ``(process name, line)`` for every new log line until ``stop`` is set (returns None) or a
    recorded process is no longer running (returns its name, after emitting its last lines)."""
    tails = {proc.name: _Tail(Path(proc.log)) for proc in record.processes}
    while True:
        for name, tail in tails.items():
            for line in tail.lines():
                emit(name, line)
        for proc in record.processes:
            if not processes.is_running(proc):
                for line in tails[proc.name].lines():
                    emit(proc.name, line)
                return proc.name
        if stop.wait(_POLL_S):
            return None
