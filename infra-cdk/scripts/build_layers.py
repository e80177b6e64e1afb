"""Build the third-party dependency layer of the Lambda functions into build/layers/deps/python.

    python infra-cdk/scripts/build_layers.py [--out build/layers/deps]

The layer holds the server's dependencies (pyproject ``dependencies`` plus the ``server`` extra, minus
what only the CLI or the local stack use) as wheels for the Lambda platform
(``manylinux2014_x86_64``, CPython 3.12: ``hivemind_infra.config``), never sdists, so nothing is
compiled on the build machine. Versions are constrained to the ones installed in the environment that
runs this script (the one the tests ran in), so the layer matches what was tested.

The core layer needs no build: ``layers/core/`` already has the Lambda layer layout (``python/hivemind``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
INFRA = HERE.parent
REPO = INFRA.parent
sys.path.insert(0, str(INFRA))

from hivemind_infra.config import LAMBDA_PLATFORM, LAMBDA_PYTHON_VERSION  # noqa: E402

# Used only by the CLI (typer, rich) or the local stack (uvicorn); never imported on Lambda.
NOT_ON_LAMBDA = frozenset({"typer", "rich", "uvicorn"})
OUR_DISTRIBUTION = "hmctl"
# Lambda allows 250 MB unzipped for the function and all its layers together.
MAX_LAYER_BYTES = 200 * 1024 * 1024


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise SystemExit(f"build_layers: cannot parse requirement {requirement!r}")
    return canonical(match.group(1))


def server_requirements(pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    requirements = [*project["dependencies"], *project["optional-dependencies"]["server"]]
    return [req for req in requirements if requirement_name(req) not in NOT_ON_LAMBDA]


def installed_constraints() -> list[str]:
    """``name==version`` of every distribution installed here (except this project itself)."""
    pins: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name and canonical(name) != OUR_DISTRIBUTION:
            pins[canonical(name)] = dist.version
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


def tree_size(path: Path) -> int:
    return sum(entry.stat().st_size for entry in path.rglob("*") if entry.is_file())


def build(out: Path) -> Path:
    target = out / "python"
    if out.exists():
        shutil.rmtree(out)
    target.mkdir(parents=True)
    requirements = server_requirements(REPO / "pyproject.toml")
    constraints = out / "constraints.txt"
    constraints.write_text("\n".join(installed_constraints()) + "\n", encoding="utf-8")
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--no-compile",
        "--platform",
        LAMBDA_PLATFORM,
        "--implementation",
        "cp",
        "--python-version",
        LAMBDA_PYTHON_VERSION,
        "--only-binary=:all:",
        "--target",
        str(target),
        "--constraint",
        str(constraints),
        *requirements,
    ]
    target_name = f"{LAMBDA_PLATFORM} / CPython {LAMBDA_PYTHON_VERSION}"
    print(f"build_layers: {len(requirements)} requirements for {target_name}")
    subprocess.run(command, check=True)  # noqa: S603 (our own interpreter, fixed arguments)
    # Console scripts are useless in a layer; caches only grow it.
    shutil.rmtree(target / "bin", ignore_errors=True)
    for cache in list(target.rglob("__pycache__")):
        shutil.rmtree(cache, ignore_errors=True)
    installed = sorted(
        f"{dist.metadata['Name']}=={dist.version}"
        for dist in importlib.metadata.distributions(path=[str(target)])
    )
    (out / "requirements.lock").write_text("\n".join(installed) + "\n", encoding="utf-8")
    size = tree_size(target)
    print(f"build_layers: {len(installed)} distributions, {size / 1024 / 1024:.1f} MiB in {target}")
    if size > MAX_LAYER_BYTES:
        raise SystemExit(f"build_layers: the layer is {size} bytes, above the {MAX_LAYER_BYTES}-byte budget")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "build" / "layers" / "deps")
    args = parser.parse_args(argv)
    build(args.out.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
