"""A small Dockerfile reader, and the checks each backend applies before anything builds or runs it.

Docker backend (:func:`check_docker_dockerfile`): every ``FROM`` names an allowed parent image or an
earlier stage, and nothing else can make the engine fetch something: no ``# syntax=`` frontend, no
variables or flags in ``FROM``, ``COPY --from`` only from earlier stages, no ``ADD`` of URLs, no
``RUN`` flags (BuildKit's ``--network``/``--mount`` could reopen the network or pull images).

Process backend (:func:`plan_process_agent`): a documented subset that can be applied without
running anything: ``FROM hivemind/agent-base:local``, ``COPY``/``ADD`` of agent files into
``/agent``, ``WORKDIR``, ``ENV``, ``USER`` (ignored: always uid 10001), ``LABEL`` (ignored),
``CMD``/``ENTRYPOINT``. Anything else is refused with the line number.
"""

from __future__ import annotations

import json
import posixpath
import re
import shlex
from dataclasses import dataclass, field

from hivemind_runner.sandbox.base import AGENT_BASE_IMAGE, CONTAINER_TMP, DockerfileRefused

_DIRECTIVE = re.compile(r"^#\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(\S.*?)\s*$")
_INSTRUCTION = re.compile(r"^\s*([A-Za-z]+)(?:\s+(.*?))?\s*$", re.DOTALL)
_FLAG = re.compile(r"^--([a-z][a-z-]*)(?:=(.*))?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_STAGE_NAME = re.compile(r"^[a-z][a-z0-9_.-]*$")


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction: upper-case keyword, raw argument text, first line number."""

    keyword: str
    arguments: str
    line: int

    def refuse(self, reason: str) -> DockerfileRefused:
        return DockerfileRefused(f"Dockerfile line {self.line} ({self.keyword}): {reason}")

    def split_flags(self) -> tuple[dict[str, str], str]:
        """Leading ``--name=value`` flags and the rest of the arguments."""
        flags: dict[str, str] = {}
        rest = self.arguments
        while rest.startswith("--"):
            token, _, remainder = rest.partition(" ")
            match = _FLAG.match(token)
            if match is None:
                raise self.refuse(f"cannot read the flag {token!r}")
            flags[match.group(1)] = match.group(2) or ""
            rest = remainder.lstrip()
        return flags, rest

    def json_form(self, text: str | None = None) -> list[str] | None:
        """The exec (JSON array of strings) form of ``text``, or None for the shell form."""
        text = self.arguments if text is None else text
        if not text.startswith("["):
            return None
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None  # Docker treats a broken JSON array as the shell form too.
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise self.refuse("the JSON form must be an array of strings")
        return value


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order, with parser directives, comments and line continuations handled."""
    lines = text.splitlines()
    escape = "\\"
    index = 0
    # Parser directives: only at the very top, before any comment, blank line or instruction.
    while index < len(lines):
        match = _DIRECTIVE.match(lines[index])
        if match is None:
            break
        name, value = match.group(1).lower(), match.group(2)
        if name == "syntax":
            raise DockerfileRefused(
                f"Dockerfile line {index + 1}: the syntax directive would fetch a frontend image; remove it"
            )
        if name == "escape":
            if value not in ("\\", "`"):
                raise DockerfileRefused(f"Dockerfile line {index + 1}: escape must be \\ or `")
            escape = value
        index += 1

    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(lines[index:], start=index + 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and pending):
            continue  # comments, and blank lines inside a continuation, are dropped
        if not stripped:
            continue
        if not pending:
            start = number
        body = raw.rstrip()
        if body.endswith(escape):
            pending.append(body[: -len(escape)])
            continue
        pending.append(body)
        instructions.append(_instruction("".join(pending), start))
        pending = []
    if pending:
        instructions.append(_instruction("".join(pending), start))
    if not instructions:
        raise DockerfileRefused("the Dockerfile has no instructions")
    return instructions


def _instruction(text: str, line: int) -> Instruction:
    match = _INSTRUCTION.match(text)
    if match is None:
        raise DockerfileRefused(f"Dockerfile line {line}: cannot read {text[:80]!r}")
    return Instruction(keyword=match.group(1).upper(), arguments=(match.group(2) or "").strip(), line=line)


# --- Docker backend -------------------------------------------------------------------------------

_DOCKER_COPY_FLAGS = frozenset({"from", "chown", "chmod"})


def _is_url(source: str) -> bool:
    return "://" in source or source.startswith("git@")


def _copy_sources(instruction: Instruction, rest: str) -> list[str]:
    exec_form = instruction.json_form(rest)
    words = exec_form if exec_form is not None else rest.split()
    if len(words) < 2:
        raise instruction.refuse("needs at least one source and a destination")
    return words[:-1]


def check_docker_dockerfile(instructions: list[Instruction], allowed_parents: tuple[str, ...]) -> set[str]:
    """Refuse anything that could reach a registry or the network; return the parent images used."""
    stages: list[str | None] = []
    parents: set[str] = set()
    for instruction in instructions:
        keyword = instruction.keyword
        if not stages and keyword not in ("FROM", "ARG"):
            raise instruction.refuse("the first instruction must be FROM")
        if keyword == "FROM":
            parents |= _check_from(instruction, stages, allowed_parents)
        elif keyword in ("COPY", "ADD"):
            flags, rest = instruction.split_flags()
            unknown = set(flags) - _DOCKER_COPY_FLAGS
            if unknown:
                raise instruction.refuse(f"flag --{sorted(unknown)[0]} is not allowed")
            if "from" in flags:
                _check_copy_from(instruction, flags["from"], stages)
            if keyword == "ADD" and any(_is_url(source) for source in _copy_sources(instruction, rest)):
                raise instruction.refuse("ADD of a URL would download from the network; vendor the file")
        elif keyword == "RUN" and instruction.arguments.startswith("--"):
            raise instruction.refuse("RUN flags (--network, --mount, --security) are not allowed")
    if not stages:
        raise DockerfileRefused("the Dockerfile has no FROM")
    return parents


def _check_from(instruction: Instruction, stages: list[str | None], allowed: tuple[str, ...]) -> set[str]:
    flags, rest = instruction.split_flags()
    if flags:
        raise instruction.refuse("FROM flags (such as --platform) are not allowed")
    if "$" in rest:
        raise instruction.refuse("variables in FROM are not allowed: name the parent image")
    words = rest.split()
    if len(words) == 3 and words[1].lower() == "as" and _STAGE_NAME.match(words[2].lower()):
        image, name = words[0], words[2].lower()
    elif len(words) == 1:
        image, name = words[0], None
    else:
        raise instruction.refuse("expected FROM <image> [AS <name>]")
    parents: set[str] = set()
    if image.lower() in {stage for stage in stages if stage}:
        pass  # an earlier stage of this Dockerfile
    elif image in allowed:
        parents.add(image)
    else:
        raise instruction.refuse(
            f"parent image {image!r} is not allowed (allowed: {', '.join(allowed)}); "
            "the runner never pulls from a registry"
        )
    stages.append(name)
    return parents


def _check_copy_from(instruction: Instruction, source: str, stages: list[str | None]) -> None:
    earlier = len(stages) - 1  # the current stage is the last one
    if source.isdigit() and int(source) < earlier:
        return
    if source.lower() in {stage for stage in stages[:earlier] if stage}:
        return
    raise instruction.refuse(f"COPY --from={source} must name an earlier stage (an image would be pulled)")


# --- process backend ------------------------------------------------------------------------------

AGENT_DIR = "/agent"
# The agent-base image's configuration (agents/base/Dockerfile), which the process backend reproduces.
BASE_WORKDIR = "/agent"
BASE_CMD = ("python3", "/agent/main.py")
BASE_ENV = {
    "LANG": "C.UTF-8",
    "HOME": CONTAINER_TMP,
    "PYTHONUNBUFFERED": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
}
_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst")


@dataclass(frozen=True)
class CopyStep:
    """Copy ``source`` (a file or directory of the agent, ``""`` for all of it, or a pattern with ``*``
    and ``?`` matched per path component as Docker does) to ``destination`` (an absolute path under
    /agent). ``into`` means the destination is a directory to copy into."""

    source: str
    destination: str
    into: bool


@dataclass
class ProcessPlan:
    """What the process backend does with an agent: copies into /agent, then how to start it."""

    copies: list[CopyStep] = field(default_factory=list)
    workdir: str = BASE_WORKDIR
    env: dict[str, str] = field(default_factory=lambda: dict(BASE_ENV))
    entrypoint: list[str] | None = None
    cmd: list[str] | None = field(default_factory=lambda: list(BASE_CMD))
    entrypoint_is_shell: bool = False
    cmd_set: bool = False

    @property
    def command(self) -> list[str]:
        """Docker's rule: a shell-form ENTRYPOINT ignores CMD; otherwise ENTRYPOINT + CMD."""
        if self.entrypoint is not None:
            return (
                list(self.entrypoint) if self.entrypoint_is_shell else [*self.entrypoint, *(self.cmd or [])]
            )
        if not self.cmd:
            raise DockerfileRefused("the Dockerfile sets no command (CMD or ENTRYPOINT)")
        return list(self.cmd)


def _no_variables(instruction: Instruction, text: str) -> None:
    if "$" in text:
        raise instruction.refuse("variable substitution is not supported by the process backend")


def _under_agent_dir(instruction: Instruction, path: str) -> str:
    normalized = posixpath.normpath(path)
    if normalized != AGENT_DIR and not normalized.startswith(AGENT_DIR + "/"):
        raise instruction.refuse(
            f"the process backend can only place files under {AGENT_DIR} (not {path}); use the Docker backend"
        )
    return normalized


def _plan_copy(instruction: Instruction, plan: ProcessPlan) -> None:
    flags, rest = instruction.split_flags()
    unknown = set(flags) - {"chown"}  # ownership is moot: /agent is read-only for the agent
    if unknown:
        raise instruction.refuse(f"flag --{sorted(unknown)[0]} is not supported by the process backend")
    _no_variables(instruction, rest)
    exec_form = instruction.json_form(rest)
    words = exec_form if exec_form is not None else rest.split()
    if len(words) < 2:
        raise instruction.refuse("needs at least one source and a destination")
    *sources, destination = words
    into = destination.endswith("/") or len(sources) > 1
    if not destination.startswith("/"):
        destination = posixpath.join(plan.workdir, destination)
    destination = _under_agent_dir(instruction, destination)
    if destination == AGENT_DIR:
        into = True  # /agent exists in the base image: a file copied "to /agent" lands inside it
    for source in sources:
        if _is_url(source):
            raise instruction.refuse("ADD of a URL would download from the network; vendor the file")
        if "[" in source or "**" in source:
            # `*` and `?` match alike in Go's filepath.Match and pathlib; classes and `**` do not.
            raise instruction.refuse("only the * and ? wildcards are supported by the process backend")
        normalized = posixpath.normpath("/" + source).lstrip("/")
        if instruction.keyword == "ADD" and normalized.endswith(_ARCHIVE_SUFFIXES):
            raise instruction.refuse(
                "ADD extracts archives; the process backend does not. Use COPY or the Docker backend"
            )
        plan.copies.append(CopyStep(source=normalized, destination=destination, into=into))


def _plan_env(instruction: Instruction, plan: ProcessPlan) -> None:
    _no_variables(instruction, instruction.arguments)
    first = instruction.arguments.split(None, 1)
    if first and "=" not in first[0]:
        # Legacy form: ENV NAME value with spaces
        if len(first) != 2:
            raise instruction.refuse("expected ENV NAME=value")
        pairs = [(first[0], first[1])]
    else:
        try:
            words = shlex.split(instruction.arguments, posix=True)
        except ValueError as exc:
            raise instruction.refuse(f"cannot read the values: {exc}") from None
        pairs = []
        for word in words:
            name, equals, value = word.partition("=")
            if not equals:
                raise instruction.refuse(f"expected NAME=value, got {word!r}")
            pairs.append((name, value))
    for name, value in pairs:
        if not _ENV_NAME.match(name) or name.startswith("HIVEMIND_"):
            raise instruction.refuse(f"cannot set the environment variable {name!r}")
        plan.env[name] = value


def _plan_command(instruction: Instruction, plan: ProcessPlan) -> None:
    exec_form = instruction.json_form()
    shell = exec_form is None
    command = ["/bin/sh", "-c", instruction.arguments] if shell else exec_form
    if instruction.keyword == "CMD":
        plan.cmd = command
        plan.cmd_set = True
    else:
        plan.entrypoint = command
        plan.entrypoint_is_shell = shell
        if not plan.cmd_set:
            plan.cmd = None  # Docker drops the base image's CMD when the Dockerfile sets ENTRYPOINT


def plan_process_agent(instructions: list[Instruction]) -> ProcessPlan:
    """The process backend's reading of a Dockerfile; raises DockerfileRefused outside the subset."""
    first = instructions[0]
    if first.keyword != "FROM":
        raise first.refuse(f"the process backend needs FROM {AGENT_BASE_IMAGE} first")
    words = first.arguments.split()
    if first.arguments.startswith("--") or not words or words[0] != AGENT_BASE_IMAGE:
        raise first.refuse(f"the process backend only runs agents built FROM {AGENT_BASE_IMAGE}")
    if len(words) not in (1, 3) or (len(words) == 3 and words[1].lower() != "as"):
        raise first.refuse("expected FROM <image> [AS <name>]")
    plan = ProcessPlan()
    for instruction in instructions[1:]:
        keyword = instruction.keyword
        if keyword in ("COPY", "ADD"):
            _plan_copy(instruction, plan)
        elif keyword == "WORKDIR":
            _no_variables(instruction, instruction.arguments)
            target = posixpath.normpath(posixpath.join(plan.workdir, instruction.arguments))
            plan.workdir = target if target == CONTAINER_TMP else _under_agent_dir(instruction, target)
        elif keyword == "ENV":
            _plan_env(instruction, plan)
        elif keyword in ("CMD", "ENTRYPOINT"):
            _plan_command(instruction, plan)
        elif keyword in ("USER", "LABEL"):
            continue  # USER: the sandbox always runs as uid 10001. LABEL: metadata only.
        elif keyword == "RUN":
            raise instruction.refuse("the process backend cannot RUN; use the Docker backend")
        elif keyword == "FROM":
            raise instruction.refuse("multi-stage builds need the Docker backend")
        else:
            raise instruction.refuse(
                f"{keyword} is not supported by the process backend; use the Docker backend"
            )
    return plan
