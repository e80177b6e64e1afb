"""Leakage evaluation: deterministic scenarios run end to end through the local stack, graded by regexes.

    .venv/bin/python eval/run.py                 # every scenario in eval/scenarios/
    .venv/bin/python eval/run.py --only row-eu-only --keep

For each scenario (``eval/scenarios/*.yaml``, format in docs/eval.md) an owner creates a room with the
scenario's rules, data and agents through ``hmctl``, shares it, and a participant accepts the exact
manifest and asks the question (with the scenario's query agent in uploadable rooms). The grader then
looks at everything the participant can obtain (the answer, the error, stdout and stderr of every
command, the receipt, the run's metadata, the artifacts) and, after all scenarios, at everything the
control plane holds (every table item and object in the emulated AWS account) and at the stack's logs
(the runner's console is outside the TEE). Graders are regular expressions and structure checks only.

A *leak* is a forbidden pattern found anywhere it must not be; any leak makes the exit status 1. A
scenario *fails* when its expected status, error code, required patterns or usage checks do not hold;
that also exits 1. Nothing here uses an LLM: rooms are created with ``--no-llm``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import yaml

REPO = Path(__file__).resolve().parent.parent
EVAL = REPO / "eval"
DEFAULT_AGENTS = {
    "scope": REPO / "agents" / "default-scope",
    "query": REPO / "agents" / "default-query",
    "mediator": REPO / "agents" / "default-mediator",
}
STATUSES = ("completed", "failed", "any")
# Values that exist only inside the sealed room data (eval/data). Rules, agent sources and scenario
# texts are public by design (the control plane stores manifests and inspectable sources in plaintext),
# so they must not contain these; the control plane and the logs must never hold them.
DATA_CANARIES = [
    "987654",
    "313131",
    "424242",
    r"zed\.canary@corp",
    "Zed Canary",
    "atlantis",
    "Skunkworks",
    "555 0199",
    "7946 0958",
    "performance plan",
    "Lisbon from 14",
]


# --- scenarios ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    cls: str
    description: str
    rules: str
    query_agent: str  # "default", or a directory (relative to the repository) of an uploaded agent
    mediator: str  # "default" or "none"
    artifacts: bool
    data: list[dict[str, Any]]
    question: str
    status: str
    error_code: str | None
    required: list[str]
    forbidden: list[str]
    usage_not: list[int]

    @property
    def uploadable(self) -> bool:
        return self.query_agent.startswith("eval/agents/")

    @classmethod
    def load(cls, path: Path) -> Scenario:
        document = yaml.safe_load(path.read_text())
        known = {"name", "class", "description", "room", "question", "expect"}
        if set(document) - known or document["name"] != path.stem:
            raise ValueError(f"{path}: unknown fields or a name that is not the file's stem")
        room, expect = document["room"], document["expect"]
        status = expect.get("status", "completed")
        if status not in STATUSES:
            raise ValueError(f"{path}: expect.status must be one of {STATUSES}")
        patterns = [*expect.get("required", []), *expect.get("forbidden", [])]
        for pattern in patterns:
            re.compile(pattern)
        for item in room["data"]:
            if not (EVAL / "data" / item["file"]).is_file():
                raise ValueError(f"{path}: no data file eval/data/{item['file']}")
        return cls(
            name=document["name"],
            cls=document["class"],
            description=document["description"],
            rules=room["rules"],
            query_agent=room.get("query_agent", "default"),
            mediator=room.get("mediator", "default"),
            artifacts=bool(room.get("artifacts", False)),
            data=room["data"],
            question=document["question"],
            status=status,
            error_code=expect.get("error_code"),
            required=list(expect.get("required", [])),
            forbidden=list(expect.get("forbidden", [])),
            usage_not=[int(value) for value in expect.get("usage_not", [])],
        )


def load_scenarios(directory: Path, only: list[str]) -> list[Scenario]:
    scenarios = [Scenario.load(path) for path in sorted(directory.glob("*.yaml"))]
    if only:
        scenarios = [scenario for scenario in scenarios if scenario.name in only]
        missing = set(only) - {scenario.name for scenario in scenarios}
        if missing:
            raise SystemExit(f"no such scenario: {', '.join(sorted(missing))}")
    return scenarios


# --- the local stack and hmctl --------------------------------------------------------------------


@dataclass
class Command:
    args: list[str]
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


class Hmctl:
    """``hmctl`` as a user runs it, in a private HOME (profiles, the stack's state, logs)."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("HMCTL_", "XDG_", "HIVEMIND_", "AWS_"))
        }
        self.env.update({"HOME": str(home), "HMCTL_NO_INPUT": "1", "COLUMNS": "200"})
        script = Path(sys.executable).parent / "hmctl"
        self.argv = [str(script)] if script.exists() else [sys.executable, "-m", "hmctl"]

    def __call__(self, *args: str, check: bool = True, timeout: float = 300) -> Command:
        completed = subprocess.run(  # noqa: S603 - our own CLI, arguments from our scenarios
            [*self.argv, *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        command = Command(list(args), completed.returncode, completed.stdout, completed.stderr)
        if check and command.code != 0:
            raise RuntimeError(f"hmctl {' '.join(args)} exited {command.code}: {command.stderr[-2000:]}")
        return command

    @property
    def logs(self) -> Path:
        return self.home / ".local" / "state" / "hmctl" / "dev" / "logs"


@dataclass
class Stack:
    cli: Hmctl
    status: dict[str, Any]

    @property
    def service(self) -> str:
        return str(self.status["service_url"])


def start_stack(home: Path) -> Stack:
    cli = Hmctl(home)
    status = cli("dev", "up", "--background", "--port", "0", "--json", timeout=600).json()
    admin = status["admin_profile"]
    owner = cli("signup", "owner", "--service", status["service_url"], "--json").json()
    cli("--profile", admin, "admin", "billing", "grant", owner["tenant_id"], "--usd", "100")
    cli("signup", "participant", "--service", status["service_url"], "--json")
    return Stack(cli=cli, status=status)


# --- one scenario ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    scenario: Scenario
    status: str | None = None
    error_code: str | None = None
    failures: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    seconds: float = 0.0
    visible: list[tuple[str, str]] = field(default_factory=list)  # (where, text) the participant saw

    @property
    def passed(self) -> bool:
        return not self.failures and not self.leaks


def create_room(stack: Stack, scenario: Scenario, workdir: Path) -> dict[str, Any]:
    rules = workdir / "rules.md"
    rules.write_text(scenario.rules)
    args = [
        "--profile", "owner", "room", "create", str(DEFAULT_AGENTS["scope"]),
        "--name", scenario.name, "--rules-file", str(rules), "--no-llm", "--json",
    ]  # fmt: skip
    if scenario.uploadable:
        args.append("--uploadable-query")
    elif scenario.query_agent == "default":
        args += ["--query-agent", str(DEFAULT_AGENTS["query"])]
    else:
        args += ["--query-agent", str(REPO / scenario.query_agent)]
    if scenario.mediator == "default":
        args += ["--mediator-agent", str(DEFAULT_AGENTS["mediator"])]
    if scenario.artifacts:
        args.append("--artifacts")
    created = stack.cli(*args).json()
    for item in scenario.data:
        meta = [part for key, value in item.get("meta", {}).items() for part in ("--meta", f"{key}={value}")]
        stack.cli(
            "--profile", "owner", "room", "add-data", created["room_id"],
            "--file", str(EVAL / "data" / item["file"]), *meta, "--json",
        )  # fmt: skip
    return created


def run_scenario(stack: Stack, scenario: Scenario) -> Outcome:
    outcome = Outcome(scenario)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"eval-{scenario.name}-") as directory:
        workdir = Path(directory)
        created = create_room(stack, scenario, workdir)
        link = created["link"]
        stack.cli(
            "--profile", "participant", "room", "accept", link,
            "--manifest-hash", created["manifest_hash"], "--json",
        )  # fmt: skip
        ask = ["--profile", "participant", "room", "ask", link, scenario.question, "--json"]
        if scenario.uploadable:
            ask += ["--query-agent", str(REPO / scenario.query_agent)]
        asked = stack.cli(*ask, check=False, timeout=900)
        outcome.visible += [("ask stdout", asked.stdout), ("ask stderr", asked.stderr)]
        try:
            answer = asked.json()
        except ValueError:
            outcome.failures.append(f"room ask printed no JSON (exit {asked.code}): {asked.stderr[-300:]}")
            return outcome
        outcome.status = answer.get("status")
        outcome.error_code = answer.get("error_code") or (answer.get("receipt") or {}).get("error_code")
        run_id = answer.get("run_id")
        if run_id:
            shown = stack.cli("--profile", "participant", "run", "show", run_id, "--json", check=False)
            outcome.visible += [("run show", shown.stdout + shown.stderr)]
            if scenario.artifacts and outcome.status == "completed":
                saved = stack.cli(
                    "--profile", "participant", "run", "artifacts", run_id,
                    "--out", str(workdir / "artifacts"), "--json", check=False,
                )  # fmt: skip
                outcome.visible += [("run artifacts", saved.stdout + saved.stderr)]
                for path in sorted((workdir / "artifacts").glob("*")):
                    outcome.visible.append(
                        (f"artifact {path.name}", path.read_bytes().decode("utf-8", "replace"))
                    )
            grade_usage(outcome, shown)
        grade_answer(outcome, answer)
    outcome.seconds = time.monotonic() - started
    grade_leaks(outcome)
    return outcome


def grade_answer(outcome: Outcome, answer: dict[str, Any]) -> None:
    scenario = outcome.scenario
    if scenario.status not in ("any", outcome.status):
        outcome.failures.append(f"status {outcome.status}, expected {scenario.status}")
    if scenario.error_code is not None and outcome.error_code != scenario.error_code:
        outcome.failures.append(f"error code {outcome.error_code}, expected {scenario.error_code}")
    if outcome.status == "completed" and answer.get("verified") is not True:
        outcome.failures.append("the answer's receipt did not verify")
    text = answer.get("output") or ""
    for pattern in scenario.required:
        if not re.search(pattern, text):
            outcome.failures.append(f"required pattern {pattern!r} is not in the answer")


def grade_usage(outcome: Outcome, shown: Command) -> None:
    """Usage leaves the TEE (tool-call counts, milliseconds): it must not carry a hidden number."""
    if not outcome.scenario.usage_not:
        return
    try:
        run = shown.json()
    except ValueError:
        outcome.failures.append("run show printed no JSON")
        return
    numbers: list[int] = []
    for stage in run.get("usage") or []:
        numbers += [int(count) for count in (stage.get("tool_calls") or {}).values()]
        numbers += [int(stage.get("duration_ms", 0)) // 100]  # tenths of a second, what a sleep could encode
    numbers.append(sum(int(c) for s in run.get("usage") or [] for c in (s.get("tool_calls") or {}).values()))
    for forbidden in outcome.scenario.usage_not:
        if forbidden in numbers:
            outcome.leaks.append(f"usage carries {forbidden}")


def grade_leaks(outcome: Outcome) -> None:
    for pattern in outcome.scenario.forbidden:
        for where, text in outcome.visible:
            if re.search(pattern, text):
                outcome.leaks.append(f"{pattern!r} in {where}")


# --- what the control plane and the logs hold -----------------------------------------------------


def control_plane_texts(stack: Stack) -> Iterator[tuple[str, str]]:
    """Every table item and every object version in the emulated account, and the stack's logs."""
    session = boto3.session.Session(
        aws_access_key_id="local",
        aws_secret_access_key="local",  # noqa: S106 - the local emulator's fixed fake credentials
        region_name=stack.status["region"],
    )
    endpoint = stack.status["aws_endpoint_url"]
    dynamodb = session.client("dynamodb", endpoint_url=endpoint)
    for table in stack.status["tables"].values():
        for page in dynamodb.get_paginator("scan").paginate(TableName=table):
            for item in page["Items"]:
                yield f"table {table}", json.dumps(item)
    s3 = session.client("s3", endpoint_url=endpoint)
    bucket = stack.status["bucket"]
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket):
        for version in page.get("Versions", []):
            body = s3.get_object(Bucket=bucket, Key=version["Key"], VersionId=version["VersionId"])[
                "Body"
            ].read()
            yield f"object {version['Key']}", body.decode("utf-8", "replace")
    for log in sorted(stack.cli.logs.glob("*.log")):
        yield f"log {log.name}", log.read_text(errors="replace")


def grade_control_plane(stack: Stack) -> list[str]:
    """The data canaries appear nowhere outside the TEE: not in a table, not in an object in plaintext,
    not in a log line."""
    found: list[str] = []
    for where, text in control_plane_texts(stack):
        found += [f"{pattern!r} in {where}" for pattern in DATA_CANARIES if re.search(pattern, text)]
    return found


# --- report ---------------------------------------------------------------------------------------


def report(outcomes: list[Outcome], control_plane_leaks: list[str]) -> str:
    lines = [f"{'class':<22} {'scenarios':>9} {'passed':>7} {'failed':>7} {'leaks':>6}"]
    classes = sorted({outcome.scenario.cls for outcome in outcomes})
    for cls in classes:
        group = [outcome for outcome in outcomes if outcome.scenario.cls == cls]
        lines.append(
            f"{cls:<22} {len(group):>9} {sum(o.passed for o in group):>7} "
            f"{sum(not o.passed for o in group):>7} {sum(len(o.leaks) for o in group):>6}"
        )
    lines.append(
        f"{'total':<22} {len(outcomes):>9} {sum(o.passed for o in outcomes):>7} "
        f"{sum(not o.passed for o in outcomes):>7} {sum(len(o.leaks) for o in outcomes):>6}"
    )
    lines.append(f"control plane and logs: {len(control_plane_leaks)} leak(s)")
    for outcome in outcomes:
        mark = "ok  " if outcome.passed else "FAIL"
        lines.append(
            f"  {mark} {outcome.scenario.name:<32} {outcome.status or '-':<10} "
            f"{outcome.error_code or '':<24} {outcome.seconds:5.1f}s"
        )
        lines += [f"       failure: {failure}" for failure in outcome.failures]
        lines += [f"       LEAK: {leak}" for leak in outcome.leaks]
    lines += [f"  LEAK (control plane): {leak}" for leak in control_plane_leaks]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenarios", type=Path, default=EVAL / "scenarios")
    parser.add_argument("--only", action="append", default=[], help="run only this scenario (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep the stack's HOME (logs) afterwards")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    scenarios = load_scenarios(args.scenarios, args.only)
    home = Path(tempfile.mkdtemp(prefix="hivemind-eval-"))
    stack: Stack | None = None
    outcomes: list[Outcome] = []
    try:
        stack = start_stack(home)
        for scenario in scenarios:
            print(f"running {scenario.name} ...", file=sys.stderr, flush=True)
            outcomes.append(run_scenario(stack, scenario))
        control_plane_leaks = grade_control_plane(stack)
    finally:
        if stack is not None:
            stack.cli("dev", "down", check=False, timeout=120)
        if args.keep:
            print(f"kept {home}", file=sys.stderr)
        else:
            shutil.rmtree(home, ignore_errors=True)
    print(report(outcomes, control_plane_leaks))
    if args.json:
        args.json.write_text(
            json.dumps(
                [
                    {
                        "name": o.scenario.name,
                        "class": o.scenario.cls,
                        "status": o.status,
                        "error_code": o.error_code,
                        "failures": o.failures,
                        "leaks": o.leaks,
                    }
                    for o in outcomes
                ],
                indent=2,
            )
        )
    leaked = any(outcome.leaks for outcome in outcomes) or bool(control_plane_leaks)
    failed = any(not outcome.passed for outcome in outcomes)
    return 1 if leaked or failed else 0


if __name__ == "__main__":
    sys.exit(main())
