"""Render app-compose.json from docker-compose.yaml, compute its compose hash, pin the runner image.

    python agent-runner/deploy/app_compose.py render            # docker-compose.yaml -> app-compose.json
    python agent-runner/deploy/app_compose.py hash              # print the compose hash rooms pin
    python agent-runner/deploy/app_compose.py check [--release] # app-compose.json is current (CI)
    python agent-runner/deploy/app_compose.py pin IMAGE@sha256:DIGEST   # set the image, then render

dstack measures the SHA-256 of the app-compose.json it is given into RTMR3 (the ``compose-hash``
event). ``render`` writes the file in dstack's deterministic JSON form (sorted keys, no spaces: the
form of ``dstack_sdk.get_compose_hash``), so the bytes on disk, the bytes uploaded to dstack and
``get_compose_hash(json.load(file))`` all give the same hash.

``allowed_envs`` is derived from the ``${NAME}`` references of docker-compose.yaml: exactly the
variables dstack may pass in encrypted. Every ``image:`` must be pinned by digest. The repository
carries ``UNPUBLISHED_DIGEST`` until a release publishes the image; ``check --release`` refuses it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

from dstack_sdk import get_compose_hash
from dstack_sdk.get_compose_hash import AppCompose, to_deterministic_json

HERE = Path(__file__).resolve().parent
DOCKER_COMPOSE = HERE / "docker-compose.yaml"
APP_COMPOSE = HERE / "app-compose.json"

UNPUBLISHED_DIGEST = "sha256:" + "0" * 64
RUNNER_IMAGE_REPOSITORY = "ghcr.io/hivemind-rooms/agent-runner"
_PINNED_IMAGE = re.compile(r"^[a-z0-9][a-z0-9./_-]*(:[A-Za-z0-9._-]+)?@sha256:[0-9a-f]{64}$")
_IMAGE_LINE = re.compile(r"^(?P<indent>\s+)image:\s*(?P<image>\S+)\s*$", re.MULTILINE)
_VARIABLE = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)")

# The dstack app settings (app-compose fields other than the compose file and the allowed variables).
APP_SETTINGS: dict[str, Any] = {
    "manifest_version": 2,
    "name": "hivemind-agent-runner",
    "runner": "docker-compose",
    # Keys come from dstack KMS, bound to this app: every instance derives the same runner keys.
    "kms_enabled": True,
    "key_provider": "kms",
    "local_key_provider_enabled": False,
    "gateway_enabled": False,
    # Runner logs stay inside the CVM; system and TCB information is public so clients can check it.
    "public_logs": False,
    "public_sysinfo": True,
    "public_tcbinfo": True,
    "no_instance_id": False,
    "secure_time": True,
}


class ComposeError(ValueError):
    """docker-compose.yaml or app-compose.json is not what a release may ship."""


def images(compose_text: str) -> list[str]:
    return [match.group("image") for match in _IMAGE_LINE.finditer(compose_text)]


def allowed_envs(compose_text: str) -> list[str]:
    return sorted(set(_VARIABLE.findall(compose_text)))


def render(compose_text: str) -> dict[str, Any]:
    """The app-compose document for ``compose_text``; refuses an image not pinned by digest."""
    found = images(compose_text)
    if not found:
        raise ComposeError("docker-compose.yaml names no image")
    for image in found:
        if not _PINNED_IMAGE.fullmatch(image):
            raise ComposeError(f"image {image!r} is not pinned by digest (name@sha256:<64 hex>)")
    return {**APP_SETTINGS, "allowed_envs": allowed_envs(compose_text), "docker_compose_file": compose_text}


def serialize(document: dict[str, Any]) -> bytes:
    """dstack's deterministic JSON of an app-compose document (what get_compose_hash hashes)."""
    return to_deterministic_json(AppCompose.from_dict(dict(document))).encode("utf-8")


def compose_hash(document: dict[str, Any]) -> str:
    return get_compose_hash(dict(document))


def check(*, release: bool) -> str:
    """Verify app-compose.json is the rendering of docker-compose.yaml; return its compose hash."""
    expected = render(DOCKER_COMPOSE.read_text(encoding="utf-8"))
    on_disk = APP_COMPOSE.read_bytes()
    if on_disk != serialize(expected):
        raise ComposeError(
            "app-compose.json is stale or not in deterministic form: run `app_compose.py render`"
        )
    digest = compose_hash(json.loads(on_disk))
    if hashlib.sha256(on_disk).hexdigest() != digest:
        raise ComposeError(
            "the file's SHA-256 differs from get_compose_hash: dstack would measure another hash"
        )
    if release and any(
        image.endswith("@" + UNPUBLISHED_DIGEST) for image in images(expected["docker_compose_file"])
    ):
        raise ComposeError("the runner image is the unpublished development pin; `pin` the released digest")
    return digest


def write(compose_text: str) -> str:
    document = render(compose_text)
    APP_COMPOSE.write_bytes(serialize(document))
    return compose_hash(document)


def pin(image: str) -> str:
    """Point the runner service at ``image`` (name@sha256:digest) and render; returns the new hash."""
    if not _PINNED_IMAGE.fullmatch(image):
        raise ComposeError(f"{image!r} is not name@sha256:<64 hex>")
    text = DOCKER_COMPOSE.read_text(encoding="utf-8")
    if len(images(text)) != 1:
        raise ComposeError("docker-compose.yaml must name exactly one image to pin it automatically")
    text = _IMAGE_LINE.sub(lambda match: f"{match.group('indent')}image: {image}", text)
    DOCKER_COMPOSE.write_text(text, encoding="utf-8")
    return write(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("render", help="write app-compose.json from docker-compose.yaml")
    commands.add_parser("hash", help="print the compose hash of app-compose.json")
    check_parser = commands.add_parser("check", help="fail if app-compose.json is not current")
    check_parser.add_argument("--release", action="store_true", help="also refuse the unpublished image pin")
    pin_parser = commands.add_parser("pin", help="set the runner image digest and render")
    pin_parser.add_argument("image", help=f"{RUNNER_IMAGE_REPOSITORY}@sha256:<digest>")
    args = parser.parse_args(argv)
    try:
        if args.command == "render":
            digest = write(DOCKER_COMPOSE.read_text(encoding="utf-8"))
        elif args.command == "pin":
            digest = pin(args.image)
        else:
            digest = check(release=getattr(args, "release", False))
    except ComposeError as exc:
        print(f"app_compose: {exc}", file=sys.stderr)
        return 1
    print(digest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
