"""``hmctl dev``: the local stack (``up``, ``down``, ``status``), the whole story (``demo``), and the agent
base image (``base-image``). DESIGN §14; the processes are supervised by :mod:`hmctl.devstack`.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Annotated

import typer
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from hivemind.attestation import is_loopback_service
from hivemind.tokens import Secret
from hmctl.commands.common import JsonFlag
from hmctl.console import Ui
from hmctl.devstack import environment
from hmctl.devstack.demo import (
    DEFAULT_QUESTION,
    OWNER_PROFILE,
    PARTICIPANT_PROFILE,
    DemoPaths,
    DemoReport,
    HmctlRunner,
    clear_stale_demo_profiles,
    run_demo,
)
from hmctl.devstack.follow import follow
from hmctl.devstack.stack import (
    ADMIN_PROFILE,
    DEFAULT_API_PORT,
    DevStack,
    RunnerBackend,
    UpOptions,
    WriteAdminProfile,
)
from hmctl.devstack.state import DevStackError, StackRecord, StackStatus, state_dir
from hmctl.errors import ExitCode
from hmctl.profiles import Profile, ProfileKind, ProfileStore
from hmctl.session import app_state

app = typer.Typer(
    help="The local stack on this machine: moto, the API with its settle worker and janitor, and a "
    "simulated runner, all on loopback.",
    no_args_is_help=True,
)

_LOG_STYLES = {"moto": "blue", "api": "green", "runner": "magenta"}


def _stack() -> DevStack:
    return DevStack(state_dir())


def _check_admin_profile_slot(store: ProfileStore, name: str) -> None:
    """``dev up`` (re)writes the admin profile; it never overwrites a profile that is not a local one."""
    if not store.exists(name):
        return
    existing = store.load(name)
    if existing.kind is not ProfileKind.ADMIN or not is_loopback_service(existing.service):
        raise DevStackError(
            f"profile {name} exists and is not a local admin profile, so hmctl dev up will not overwrite it",
            hint="pass --admin-profile with another name",
            code="admin_profile_taken",
            exit_code=ExitCode.USAGE,
        )


def _admin_profile_writer(store: ProfileStore) -> WriteAdminProfile:
    def write(name: str, secret: Secret, service_url: str) -> None:
        store.save(Profile(name=name, service=service_url, key=secret.token()))

    return write


def _show_status(ui: Ui, status: StackStatus, record: StackRecord | None, stack: DevStack) -> None:
    ui.fields(
        {
            "service": status.service_url,
            "admin profile": status.admin_profile,
            "runner backend": status.runner_backend,
            "AWS endpoint (moto)": status.aws_endpoint_url,
            "region": status.region,
            "bucket": status.bucket,
            "logs": str(stack.logs),
        },
        title="local stack",
    )
    if record is not None:
        ui.table(
            ["process", "pid", "log"],
            [[proc.name, proc.pid, proc.log] for proc in record.processes],
        )


@app.command("up")
def up(
    ctx: typer.Context,
    *,
    background: Annotated[
        bool, typer.Option("--background", "-d", help="Return once the stack answers; it keeps running.")
    ] = False,
    port: Annotated[
        int, typer.Option("--port", help="Loopback port of the API (0: any free port).")
    ] = DEFAULT_API_PORT,
    aws_port: Annotated[
        int, typer.Option("--aws-port", help="Loopback port of moto (0: any free port).")
    ] = 0,
    runner_backend: Annotated[
        RunnerBackend,
        typer.Option(help="Agent sandboxes: docker, process, or auto (docker when an engine answers)."),
    ] = RunnerBackend.AUTO,
    admin_profile: Annotated[
        str, typer.Option(help="Profile to write the local admin key to.")
    ] = ADMIN_PROFILE,
    json_output: JsonFlag = False,
) -> None:
    """Start the local stack (moto, the API with settle worker and janitor, a simulated runner).

    In the foreground it streams the logs until Ctrl-C, then stops everything. With --background it
    returns once the API answers and the runner's attestation is served. --json prints what
    `hmctl dev status --json` prints.
    """
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    stack = _stack()
    _check_admin_profile_slot(state.store, admin_profile)
    options = UpOptions(
        api_port=port, aws_port=aws_port, runner_backend=runner_backend, admin_profile=admin_profile
    )
    result = stack.up(options, write_admin_profile=_admin_profile_writer(state.store), say=ui.info)
    status = result.record.status
    assert status is not None
    if json_output:
        ui.print_json(status.model_dump())
    else:
        if result.already_running:
            ui.info("the local stack is already running")
        else:
            ui.success(f"the local stack answers at {status.service_url}")
        _show_status(ui, status, result.record, stack)
        ui.info(
            f"next: hmctl dev demo  |  hmctl signup NAME --service {status.service_url}  |  "
            f"hmctl --profile {status.admin_profile} admin billing accounts"
        )
    if background or result.already_running:
        return
    _follow_until_interrupted(ui, stack, result.record)


def _follow_until_interrupted(ui: Ui, stack: DevStack, record: StackRecord) -> None:
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        del signum, frame
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    ui.info("streaming logs; Ctrl-C stops the local stack")

    def emit(name: str, line: str) -> None:
        style = _LOG_STYLES.get(name, "white")
        ui.err.print(f"[{style}]{name:>6}[/{style}] | {escape(line)}", soft_wrap=True)

    try:
        died = follow(record, emit, stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    ui.info("stopping the local stack")
    stack.down(say=ui.info)
    if died is not None:
        raise DevStackError(
            f"the {died} process stopped on its own, so the stack was stopped",
            hint=f"see its log: {stack.logs / (died + '.log')}",
            code="dev_stack_process_died",
        )
    ui.success("the local stack is stopped")


@app.command("down")
def down(json_output: JsonFlag = False) -> None:
    """Stop every process the local stack started (and only those); its data goes with it."""
    ui = Ui(json_output=json_output)
    stopped = _stack().down(say=ui.info)
    if json_output:
        ui.print_json({"stopped": stopped})
    elif stopped:
        ui.success(f"stopped {', '.join(stopped)}")
    else:
        ui.info("the local stack is not running")


@app.command("status")
def status(json_output: JsonFlag = False) -> None:
    """Where the running local stack listens.

    --json prints {"service_url", "aws_endpoint_url", "region", "bucket", "tables", "queues",
    "admin_profile", "runner_backend"}. Exits 8 when the stack is not running (or not healthy).
    """
    ui = Ui(json_output=json_output)
    stack = _stack()
    current = stack.running_status()
    if json_output:
        ui.print_json(current.model_dump())
        return
    _show_status(ui, current, stack.record(), stack)


@app.command("base-image")
def base_image(
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if the image is up to date.")] = False,
) -> None:
    """Build the agent base image (hivemind/agent-base:local) without a registry.

    Runs agents/base/build-base-image.sh from the source tree (debootstrap, docker import, docker build);
    an installed hmctl finds the tree through HMCTL_REPO.
    """
    ui = Ui()
    if not environment.docker_answers():
        raise DevStackError(
            "no Docker engine answers",
            hint="start one (agent-runner/deploy/dockerd.sh, as root) and run this again",
            code="docker_unavailable",
            exit_code=ExitCode.UNAVAILABLE,
        )
    image_id = environment.build_base_image(force=force)
    ui.success(f"{environment.AGENT_BASE_IMAGE} is {image_id or 'built'}")


@app.command("demo")
def demo(
    ctx: typer.Context,
    *,
    question: Annotated[str, typer.Option(help="What the participant asks.")] = DEFAULT_QUESTION,
    json_output: JsonFlag = False,
) -> None:
    """Run the owner -> participant story on the local stack, printing each step.

    Starts the stack in the background if needed. An owner makes a room from the bundled sample data
    and default agents and shares it; a participant verifies, accepts, asks, and gets a decrypted
    answer with a verified receipt. The profiles demo-owner and demo-participant are (re)created.
    """
    state = app_state(ctx)
    ui = Ui(json_output=json_output)
    paths = DemoPaths.in_repo(environment.find_repo())
    stack = _stack()
    record = stack.record()
    if record is None or record.status is None or stack.dead_processes(record):
        ui.info("starting the local stack in the background (hmctl dev up --background)")
        _check_admin_profile_slot(state.store, ADMIN_PROFILE)
        record = stack.up(
            UpOptions(), write_admin_profile=_admin_profile_writer(state.store), say=ui.info
        ).record
    current = stack.running_status()
    removed = clear_stale_demo_profiles(state.store, [OWNER_PROFILE, PARTICIPANT_PROFILE])
    if removed:
        ui.info(f"replacing the demo profiles of an earlier run: {', '.join(removed)}")

    def step(number: int, title: str) -> None:
        ui.err.print(f"\n[bold cyan]{number}.[/bold cyan] [bold]{escape(title)}[/bold]")

    def note(text: str) -> None:
        ui.err.print(f"   [green]✓[/green] {escape(text)}")

    def show_command(command: str) -> None:
        ui.err.print(f"   [dim]$ {escape(command)}[/dim]")

    report = run_demo(
        service_url=current.service_url,
        admin_profile=current.admin_profile,
        paths=paths,
        hmctl=HmctlRunner(show_command=show_command),
        step=step,
        note=note,
        question=question,
    )
    summary = report.receipt_summary()
    if json_output:
        ui.print_json(
            {
                "question": question,
                "answer": report.answer,
                "receipt_summary": summary,
                "room_id": report.room_id,
            }
        )
        return
    _show_answer(ui, question, report)
    ui.info("next: docs/quickstart.md and docs/cookbook.md; stop the stack with: hmctl dev down")


def _show_answer(ui: Ui, question: str, report: DemoReport) -> None:
    summary = report.receipt_summary()
    ui.out.print()
    ui.out.print(Panel(escape(report.answer.rstrip()), title=f"answer: {escape(question)}", expand=False))
    table = Table(title="receipt", title_justify="left", show_header=False, box=None, padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    table.add_row("run id", escape(str(summary["run_id"])))
    table.add_row("manifest hash", escape(str(summary["manifest_hash"])))
    table.add_row("compose hash", escape(str(summary["compose_hash"])))
    table.add_row("scope policy hash", escape(str(summary["scope_policy_hash"])))
    table.add_row("output hash", escape(str(summary["output_sha256"])))
    table.add_row("signed by", escape(f"{summary['signer_pub']} (the attested runner key)"))
    verified = "[bold green]yes[/bold green]" if summary["verified"] else "[bold red]NO[/bold red]"
    table.add_row("verified", verified)
    ui.out.print(table)
    agents = Table(title="agents in the receipt", title_justify="left", header_style="bold")
    for column in ("stage", "agent", "source digest", "image digest"):
        agents.add_column(column, overflow="fold")
    for agent in summary["agents"]:
        agents.add_row(
            escape(str(agent["stage"])),
            escape(str(agent["agent_id"])),
            escape(str(agent["source_digest"])),
            escape(str(agent.get("image_digest") or "-")),
        )
    ui.out.print(agents)
