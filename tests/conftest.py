"""Shared fixtures: a real moto server on loopback and a fresh, isolated deployment per test.

Use them from any test (control plane, runner, CLI)::

    def test_something(store: Store) -> None:              # repositories on a fresh deployment
        ...

    def test_app(store_config: StoreConfig, store_env) -> None:  # HIVEMIND_* env for code that reads it
        ...

- ``moto_server`` (session): the endpoint URL of one moto server for the whole run (S3, DynamoDB,
  SQS; DynamoDB requests are serialised like real DynamoDB, see ``hivemind.store.local``).
- ``store_config``: a :class:`StoreConfig` with a unique deployment prefix, its tables, bucket and
  queues already created, so tests never see each other's data on the shared server.
- ``aws``: the :class:`AwsClients` for that deployment; ``store``: a :class:`Store` on it.
- ``store_env``: sets that deployment's ``HIVEMIND_*`` variables in ``os.environ`` for the test.
- ``shared_dir``: the ``shared/`` directory next to the repository (test vectors).

Tests that use ``moto_server`` (directly or through these fixtures) are marked ``moto_server``
automatically, so ``-m "not moto_server"`` skips them.

Real AWS is unreachable from the tests: fake credentials and region are forced below, before anything
creates a boto3 client, and no shared AWS profile is read.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from hivemind.store import AwsClients, Store, StoreConfig
from hivemind.store.bootstrap import create_all
from hivemind.store.local import LocalMotoServer

_FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
os.environ.update(_FAKE_AWS_ENV)
os.environ.pop("AWS_PROFILE", None)

REPO_ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "moto_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.moto_server)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """Endpoint URL of a moto server on 127.0.0.1 and a free port, shared by the whole session."""
    server = LocalMotoServer()
    server.start()
    try:
        yield server.endpoint_url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def _boto_session() -> boto3.session.Session:
    # One session for all test deployments: botocore caches service models per session, so clients
    # are created in milliseconds instead of reloading the models for every test.
    return boto3.session.Session(region_name="us-east-1")


@pytest.fixture
def store_config(moto_server: str, _boto_session: boto3.session.Session) -> StoreConfig:
    """A new deployment (unique prefix) with every table, the bucket and the queues created."""
    config = StoreConfig(prefix=f"t{uuid.uuid4().hex[:12]}", region="us-east-1", endpoint_url=moto_server)
    create_all(AwsClients(config, session=_boto_session))
    return config


@pytest.fixture
def aws(store_config: StoreConfig, _boto_session: boto3.session.Session) -> AwsClients:
    return AwsClients(store_config, session=_boto_session)


@pytest.fixture
def store(aws: AwsClients) -> Store:
    return Store(aws)


@pytest.fixture
def store_env(store_config: StoreConfig, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Export the deployment as ``HIVEMIND_*`` variables (``StoreConfig.from_env`` finds it)."""
    env = store_config.to_env()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``shared/`` next to the repository: test vectors (TDX quotes and collateral, ...)."""
    path = REPO_ROOT.parent / "shared"
    if not path.is_dir():
        pytest.skip(f"shared directory {path} is not present")
    return path
