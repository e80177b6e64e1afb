"""What the CLI shows: data on stdout (tables, or JSON with ``--json``), everything else on stderr.

Progress bars and the live stage display appear only when stderr is a terminal, so scripts reading
stdout (and logs capturing stderr) stay clean. Secrets never pass through here in the clear.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

NO_INPUT_ENV = "HMCTL_NO_INPUT"
STAGES = ("scope", "query", "mediator")


def stdin_is_interactive() -> bool:
    """Whether a person can answer prompts (a terminal on stdin, and HMCTL_NO_INPUT unset)."""
    return sys.stdin.isatty() and not os.environ.get(NO_INPUT_ENV)


class Ui:
    """Output for one command invocation."""

    def __init__(self, *, json_output: bool = False, data_to_stderr: bool = False) -> None:
        self.json_output = json_output
        self.out = Console(stderr=data_to_stderr, soft_wrap=True, highlight=False)
        self.err = Console(stderr=True, soft_wrap=True, highlight=False)

    def on_stderr(self) -> Ui:
        """A Ui that shows tables on stderr too: for prompts in commands whose stdout is data."""
        return Ui(json_output=self.json_output, data_to_stderr=True)

    @property
    def interactive(self) -> bool:
        return stdin_is_interactive()

    @property
    def live(self) -> bool:
        """Whether to animate on stderr (spinners, progress bars)."""
        return self.err.is_terminal

    # --- messages (stderr) ---------------------------------------------------------------------------

    def info(self, message: str) -> None:
        self.err.print(escape(message))

    def success(self, message: str) -> None:
        self.err.print(f"[green]✓[/green] {escape(message)}")

    def warn(self, message: str) -> None:
        self.err.print(f"[yellow]warning:[/yellow] {escape(message)}")

    def error(self, message: str, hint: str | None = None) -> None:
        self.err.print(f"[bold red]error:[/bold red] {escape(message)}")
        if hint:
            self.err.print(f"[cyan]next:[/cyan] {escape(hint)}")

    def danger_banner(self, message: str) -> None:
        self.err.print(Panel(escape(message), title="DANGER", style="bold white on red", expand=True))

    def confirm(self, question: str, *, default: bool = False, piped: bool = False) -> bool:
        """Ask a yes/no question. Without a terminal the answer is "no", unless ``piped`` lets an
        answer come from stdin (``echo y | hmctl room accept LINK``); end of input is "no"."""
        if not self.interactive and not (piped and not os.environ.get(NO_INPUT_ENV)):
            return False
        suffix = " [Y/n] " if default else " [y/N] "
        self.err.print(escape(question) + suffix, end="")
        line = sys.stdin.readline()
        if not line:
            return False
        answer = line.strip().lower()
        if not answer:
            return default
        return answer in ("y", "yes")

    def prompt_secret(self, question: str) -> str:
        """Read a secret without echo (terminal) or one line from stdin (pipes)."""
        if self.interactive:
            return self.err.input(escape(question) + " ", password=True).strip()
        return sys.stdin.readline().strip()

    # --- data (stdout) -------------------------------------------------------------------------------

    def print_json(self, data: Any) -> None:
        self.out.file.write(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        self.out.file.flush()

    def print(self, text: str) -> None:
        self.out.print(escape(text))

    def raw(self, text: str) -> None:
        self.out.file.write(text)
        self.out.file.flush()

    def table(
        self, columns: Sequence[str], rows: Sequence[Sequence[Any]], *, title: str | None = None
    ) -> None:
        table = Table(title=title, show_lines=False, header_style="bold")
        for column in columns:
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(*("" if value is None else escape(str(value)) for value in row))
        self.out.print(table)

    def fields(self, pairs: Mapping[str, Any], *, title: str | None = None) -> None:
        table = Table(title=title, show_header=False, box=None, padding=(0, 2))
        table.add_column(style="bold")
        table.add_column(overflow="fold")
        for key, value in pairs.items():
            table.add_row(escape(key), "" if value is None else escape(str(value)))
        self.out.print(table)

    # --- progress (stderr) ---------------------------------------------------------------------------

    @contextmanager
    def transfer(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        """A progress bar for ``total`` bytes; yields ``advance(n)``. Silent when stderr is no terminal."""
        if not self.live:
            yield lambda _n: None
            return
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=self.err,
            transient=True,
        )
        with progress:
            task = progress.add_task(escape(description), total=total)
            yield lambda n: progress.advance(task, n)

    @contextmanager
    def stage_display(self, run_id: str) -> Iterator[Callable[[Mapping[str, Any]], None]]:
        """A spinner showing the run's stage (scope -> query -> mediator); yields ``update(run_view)``."""
        if not self.live:
            yield lambda _view: None
            return
        with self.err.status(_stage_line(run_id, "pending", None)) as status:
            yield lambda view: status.update(_stage_line(run_id, str(view.get("status")), view.get("stage")))


def _stage_line(run_id: str, status: str, stage: Any) -> str:
    parts = []
    reached = STAGES.index(stage) if stage in STAGES else -1
    for index, name in enumerate(STAGES):
        if index == reached:
            parts.append(f"[bold cyan]{name}[/bold cyan]")
        elif index < reached:
            parts.append(f"[green]{name}[/green]")
        else:
            parts.append(f"[dim]{name}[/dim]")
    return f"run {escape(run_id)} [bold]{escape(status)}[/bold]  " + " → ".join(parts)
