"""What the local stack needs from the machine: Python components, a Docker engine, the source tree.

The runner decides between its Docker and process backends the same way (an engine that answers wins),
but the stack decides first and tells it, so ``hmctl dev status`` can say which one is in use.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from hmctl.devstack.state import DevStackError
from hmctl.errors import ExitCode

# The image every agent Dockerfile starts FROM (the runner refuses any other parent).
AGENT_BASE_IMAGE = "hivemind/agent-base:local"
REPO_ENV = "HMCTL_REPO"
BASE_IMAGE_SCRIPT = Path("agents") / "base" / "build-base-image.sh"
DOCKER_PROBE_TIMEOUT_S = 5

# module -> what provides it
_STACK_MODULES = {
    "moto": "moto[server] (the local AWS emulator)",
    "uvicorn": "uvicorn (serves the API)",
    "fastapi": "fastapi",
    "mangum": "mangum",
    "aws_lambda_powertools": "aws-lambda-powertools",
    "hivemind_functions": "the control plane (hmctl's own package)",
    "hivemind_runner": "the runner (hmctl's own package)",
    "dstack_sdk": "dstack-sdk (the runner's TEE client)",
}


def missing_stack_modules() -> list[str]:
    """Descriptions of the Python components ``hmctl dev up`` needs that this environment lacks."""
    return [what for module, what in _STACK_MODULES.items() if importlib.util.find_spec(module) is None]


def require_stack_modules() -> None:
    missing = missing_stack_modules()
    if missing:
        raise DevStackError(
            "the local stack needs components this Python environment lacks: "
            + ", ".join(missing)
            + ". Install them with: pip install 'hmctl[dev,runner]' (or run make setup in a clone)",
            code="dev_components_missing",
            exit_code=ExitCode.USAGE,
        )


def docker_answers() -> bool:
    """True when a Docker engine answers a ping (through the Docker SDK the runner uses)."""
    if importlib.util.find_spec("docker") is None:
        return False
    import docker  # noqa: PLC0415 - optional (the runner extra)
    import docker.errors  # noqa: PLC0415

    try:
        client = docker.from_env(timeout=DOCKER_PROBE_TIMEOUT_S)
    except docker.errors.DockerException:
        return False
    try:
        return bool(client.ping())
    except Exception:  # any transport failure means: no engine we can use
        return False
    finally:
        client.close()


def docker_image_exists(name: str) -> bool:
    import docker  # noqa: PLC0415 - only called once docker_answers() said yes
    import docker.errors  # noqa: PLC0415

    client = docker.from_env(timeout=DOCKER_PROBE_TIMEOUT_S)
    try:
        client.images.get(name)
        return True
    except docker.errors.ImageNotFound:
        return False
    finally:
        client.close()


def _is_repo(path: Path) -> bool:
    return (path / BASE_IMAGE_SCRIPT).is_file() and (path / "agents" / "examples").is_dir()


def find_repo() -> Path:
    """The Hivemind source tree (agents, sample data, the base image script).

    Looked up in order: ``$HMCTL_REPO``; the tree this package runs from (an editable install or a
    clone); the current directory and its parents. A wheel does not carry ``agents/``, so an installed
    hmctl needs a clone and ``HMCTL_REPO`` for ``dev base-image`` and ``dev demo``.
    """
    explicit = os.environ.get(REPO_ENV)
    if explicit:
        path = Path(explicit).expanduser().resolve()
        if not _is_repo(path):
            raise DevStackError(
                f"{REPO_ENV}={explicit} is not a Hivemind source tree (no {BASE_IMAGE_SCRIPT} there)",
                code="dev_repo_not_found",
                exit_code=ExitCode.USAGE,
            )
        return path
    here = Path(__file__).resolve()
    for candidate in [*here.parents, Path.cwd().resolve(), *Path.cwd().resolve().parents]:
        if _is_repo(candidate):
            return candidate
    raise DevStackError(
        "this needs the Hivemind source tree (agents/base, agents/sdk, agents/examples), which an "
        f"installed hmctl does not carry: run it from a clone, or set {REPO_ENV}=/path/to/clone",
        code="dev_repo_not_found",
        exit_code=ExitCode.USAGE,
    )


def build_base_image(*, force: bool = False) -> str:
    """Run ``agents/base/build-base-image.sh`` (progress on stderr); returns the image id it prints."""
    script = find_repo() / BASE_IMAGE_SCRIPT
    argv = ["bash", str(script), *(["--force"] if force else [])]
    completed = subprocess.run(  # noqa: S603 - fixed script of the source tree
        argv, stdout=subprocess.PIPE, stderr=sys.stderr, text=True, check=False
    )
    if completed.returncode != 0:
        raise DevStackError(
            f"building the agent base image failed ({script} exited {completed.returncode}); "
            "its messages above say why",
            code="base_image_failed",
        )
    lines = completed.stdout.strip().splitlines()
    return lines[-1] if lines else ""
