"""agent-runner/deploy: app-compose.json is the current rendering of docker-compose.yaml, its hash is what
dstack measures, and only digest-pinned images can be released."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from dstack_sdk import get_compose_hash

from .conftest import REPO

DEPLOY = REPO / "agent-runner" / "deploy"
RELEASED = "ghcr.io/hivemind-rooms/agent-runner@sha256:" + "ab" * 32


def _module() -> Any:
    spec = importlib.util.spec_from_file_location("app_compose", DEPLOY / "app_compose.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The module working on copies of the two files, so tests never touch the repository's."""
    module = _module()
    for name in ("docker-compose.yaml", "app-compose.json"):
        shutil.copy(DEPLOY / name, tmp_path / name)
    monkeypatch.setattr(module, "DOCKER_COMPOSE", tmp_path / "docker-compose.yaml")
    monkeypatch.setattr(module, "APP_COMPOSE", tmp_path / "app-compose.json")
    return module


def test_committed_app_compose_is_current_and_hashes_like_dstack() -> None:
    module = _module()
    digest = module.check(release=False)
    raw = (DEPLOY / "app-compose.json").read_bytes()
    assert digest == hashlib.sha256(raw).hexdigest() == get_compose_hash(json.loads(raw))
    document = json.loads(raw)
    assert document["docker_compose_file"] == (DEPLOY / "docker-compose.yaml").read_text()
    assert document["runner"] == "docker-compose" and document["kms_enabled"] is True
    # Exactly the variables the compose file references may be passed in encrypted.
    assert "HIVEMIND_RUNNER_SECRET_ACCESS_KEY" in document["allowed_envs"]
    assert "AWS_SECRET_ACCESS_KEY" not in document["allowed_envs"]


def test_the_unpublished_pin_cannot_be_released() -> None:
    module = _module()
    with pytest.raises(module.ComposeError, match="unpublished"):
        module.check(release=True)


def test_an_image_tag_is_refused() -> None:
    module = _module()
    text = (DEPLOY / "docker-compose.yaml").read_text()
    tagged = text.replace(module.images(text)[0], "ghcr.io/hivemind-rooms/agent-runner:latest")
    with pytest.raises(module.ComposeError, match="not pinned by digest"):
        module.render(tagged)


def test_pinning_a_release_changes_the_compose_hash_and_passes_the_release_check(workdir: Any) -> None:
    before = workdir.check(release=False)
    after = workdir.pin(RELEASED)
    assert after != before
    assert workdir.check(release=True) == after
    assert workdir.images(workdir.DOCKER_COMPOSE.read_text()) == [RELEASED]
    with pytest.raises(workdir.ComposeError):
        workdir.pin("ghcr.io/hivemind-rooms/agent-runner:v2")


def test_any_edit_of_the_compose_file_makes_app_compose_stale(workdir: Any) -> None:
    compose = workdir.DOCKER_COMPOSE
    compose.write_text(compose.read_text() + "# a comment is part of the measured build too\n")
    with pytest.raises(workdir.ComposeError, match="stale"):
        workdir.check(release=False)
    rendered = workdir.write(compose.read_text())
    assert workdir.check(release=False) == rendered


def test_a_reformatted_app_compose_is_refused(workdir: Any) -> None:
    document = json.loads(workdir.APP_COMPOSE.read_bytes())
    workdir.APP_COMPOSE.write_text(json.dumps(document, indent=2))
    with pytest.raises(workdir.ComposeError, match="deterministic"):
        workdir.check(release=False)
