"""Where the store lives (:class:`StoreConfig`) and the one factory of boto3 clients (:class:`AwsClients`).

Nothing else in the code base creates boto3 clients: every function, the runner and the CLI's local
stack go through :class:`AwsClients`, so retries, timeouts and the moto endpoint are set in one place.

Environment variables (all optional):

- ``HIVEMIND_PREFIX``: deployment prefix, names are ``<prefix>-<role>`` (default ``hivemind``);
- ``HIVEMIND_REGION``: AWS region (falls back to ``AWS_REGION``, ``AWS_DEFAULT_REGION``, ``us-east-1``);
- ``HIVEMIND_ENDPOINT_URL``: one endpoint for S3, DynamoDB and SQS, e.g. a moto server; unset on AWS;
- ``HIVEMIND_BUCKET``: bucket name when it is not ``<prefix>-blobs`` (S3 names are global on AWS).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from pydantic import BaseModel, ConfigDict, Field, field_validator

from hivemind.errors import InvalidInput, StoreError
from hivemind.store.schema import PREFIX_PATTERN, SCHEMA, QueueRole, TableRole, resource_name

_REGION_PATTERN = r"^[a-z]{2}(-[a-z]+)+-\d$"
_CREATION_LOCK = threading.Lock()


class StoreConfig(BaseModel):
    """A deployment's storage coordinates. Immutable; build it once per process."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prefix: str = "hivemind"
    region: str = Field(default="us-east-1", pattern=_REGION_PATTERN)
    endpoint_url: str | None = None
    bucket_name: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")

    @field_validator("prefix")
    @classmethod
    def _valid_prefix(cls, value: str) -> str:
        if not PREFIX_PATTERN.fullmatch(value) or "--" in value:
            raise ValueError("prefix must be 3-40 lowercase letters, digits and single hyphens")
        return value

    @field_validator("endpoint_url")
    @classmethod
    def _valid_endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("endpoint_url must be an http(s) URL")
        return value.rstrip("/")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> StoreConfig:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        if env.get("HIVEMIND_PREFIX"):
            values["prefix"] = env["HIVEMIND_PREFIX"]
        region = env.get("HIVEMIND_REGION") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
        if region:
            values["region"] = region
        if env.get("HIVEMIND_ENDPOINT_URL"):
            values["endpoint_url"] = env["HIVEMIND_ENDPOINT_URL"]
        if env.get("HIVEMIND_BUCKET"):
            values["bucket_name"] = env["HIVEMIND_BUCKET"]
        try:
            return cls(**values)
        except ValueError as exc:
            raise InvalidInput(f"invalid HIVEMIND_* storage settings: {exc}") from None

    def to_env(self) -> dict[str, str]:
        """The environment that makes :meth:`from_env` in another process return this config."""
        env = {"HIVEMIND_PREFIX": self.prefix, "HIVEMIND_REGION": self.region}
        if self.bucket_name is not None:
            env["HIVEMIND_BUCKET"] = self.bucket_name
        if self.endpoint_url is not None:
            env["HIVEMIND_ENDPOINT_URL"] = self.endpoint_url
        return env

    def table_name(self, role: TableRole) -> str:
        return resource_name(self.prefix, role.value)

    @property
    def bucket(self) -> str:
        return self.bucket_name or resource_name(self.prefix, SCHEMA.bucket.role)

    def queue_name(self, role: QueueRole) -> str:
        return resource_name(self.prefix, role.value)


def _botocore_config(*, s3: bool, local: bool) -> Config:
    options: dict[str, Any] = {
        # "standard" retries throttling and transient errors with backoff; conditional-check failures and
        # cancelled transactions are answers, not errors, and are never retried by botocore.
        "retries": {"mode": "standard", "max_attempts": 5},
        "connect_timeout": 5,
        # Above the SQS long-poll wait (20 s) so a receive is never cut short.
        "read_timeout": 30,
        "max_pool_connections": 64,
        "tcp_keepalive": True,
    }
    if s3:
        options["signature_version"] = "s3v4"
        options["s3"] = {"addressing_style": "path" if local else "virtual"}
    return Config(**options)


class AwsClients:
    """Lazily created, cached boto3 clients for one :class:`StoreConfig`.

    boto3 clients are thread-safe once created, but creating them from a session is not, and a session
    may be shared between instances, so creation is serialised by one process-wide lock (it happens a
    handful of times per process). Share one instance per process.
    """

    def __init__(self, config: StoreConfig, *, session: boto3.session.Session | None = None) -> None:
        self.config = config
        self._session = session or boto3.session.Session(region_name=config.region)
        self._lock = _CREATION_LOCK
        self._clients: dict[str, Any] = {}
        self._queue_urls: dict[QueueRole, str] = {}

    def _client(self, service: str) -> Any:
        client = self._clients.get(service)
        if client is not None:
            return client
        with self._lock:
            client = self._clients.get(service)
            if client is None:
                local = self.config.endpoint_url is not None
                client = self._session.client(
                    service,
                    region_name=self.config.region,
                    endpoint_url=self.config.endpoint_url,
                    config=_botocore_config(s3=service == "s3", local=local),
                )
                self._clients[service] = client
            return client

    @property
    def dynamodb(self) -> Any:
        return self._client("dynamodb")

    @property
    def s3(self) -> Any:
        return self._client("s3")

    @property
    def sqs(self) -> Any:
        return self._client("sqs")

    def queue_url(self, role: QueueRole) -> str:
        """The URL of a queue of this deployment (resolved once, then cached)."""
        url = self._queue_urls.get(role)
        if url is not None:
            return url
        name = self.config.queue_name(role)
        try:
            url = self.sqs.get_queue_url(QueueName=name)["QueueUrl"]
        except self.sqs.exceptions.QueueDoesNotExist:
            raise StoreError(f"queue {name} does not exist; create the deployment first") from None
        with self._lock:
            self._queue_urls[role] = url
        return url
