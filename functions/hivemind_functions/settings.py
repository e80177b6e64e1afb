"""Deployment switches and limits of the control plane, read once per process from ``HIVEMIND_*``.

| variable | field | default |
|---|---|---|
| ``HIVEMIND_BILLING_ENFORCE_CREDITS`` | ``billing_enforce_credits`` | ``true`` |
| ``HIVEMIND_SELF_SERVE_SIGNUP_ENABLED`` | ``self_serve_signup`` | ``false`` |
| ``HIVEMIND_ALLOWED_LLM_PROVIDERS`` | ``allowed_llm_providers`` (comma-separated) | none |
| ``HIVEMIND_LONG_POLL_MAX_S`` | ``long_poll_max_s`` | 20 |
| ``HIVEMIND_MAX_BODY_BYTES`` | ``max_body_bytes`` | 5 MiB |
| ``HIVEMIND_ADMISSION_EXTRA_POLICIES`` | ``admission_extra_policies`` | none |
| ``HIVEMIND_RUN_PENDING_TTL_S`` | ``run_pending_ttl_s`` | 3600 |
| ``HIVEMIND_RUN_RUNNING_TTL_S`` | ``run_running_ttl_s`` | 3600 |
| ``HIVEMIND_RUN_RATE_LIMIT_PER_MINUTE`` | ``run_rate_limit_per_minute`` | 30 |
| ``HIVEMIND_UPLOAD_TTL_S`` | ``upload_ttl_s`` | 86400 |
| ``HIVEMIND_PRESIGN_PUT_EXPIRES_S`` | ``presign_put_expires_s`` | 900 |
| ``HIVEMIND_PRESIGN_GET_EXPIRES_S`` | ``presign_get_expires_s`` | 300 |
| ``HIVEMIND_RUNNER_MAX_HEARTBEAT_AGE_S`` | ``runner_max_heartbeat_age_s`` | 120 |
| ``HIVEMIND_MAX_AGENT_ARCHIVE_BYTES`` | ``max_agent_archive_bytes`` | 50 MiB |
| ``HIVEMIND_LOG_LEVEL`` | ``log_level`` | ``INFO`` |

Storage coordinates (``HIVEMIND_PREFIX``, ``HIVEMIND_ENDPOINT_URL``, ...) are :class:`StoreConfig`'s.
A malformed value is an error at start-up, never a silent default.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from hivemind.errors import InvalidInput
from hivemind.store import StoreConfig

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_PROVIDER = r"^[a-z0-9][a-z0-9._-]{0,63}$"

# field name -> environment variable
ENV_VARIABLES: dict[str, str] = {
    "billing_enforce_credits": "HIVEMIND_BILLING_ENFORCE_CREDITS",
    "self_serve_signup": "HIVEMIND_SELF_SERVE_SIGNUP_ENABLED",
    "allowed_llm_providers": "HIVEMIND_ALLOWED_LLM_PROVIDERS",
    "long_poll_max_s": "HIVEMIND_LONG_POLL_MAX_S",
    "max_body_bytes": "HIVEMIND_MAX_BODY_BYTES",
    "admission_extra_policies": "HIVEMIND_ADMISSION_EXTRA_POLICIES",
    "run_pending_ttl_s": "HIVEMIND_RUN_PENDING_TTL_S",
    "run_running_ttl_s": "HIVEMIND_RUN_RUNNING_TTL_S",
    "run_rate_limit_per_minute": "HIVEMIND_RUN_RATE_LIMIT_PER_MINUTE",
    "upload_ttl_s": "HIVEMIND_UPLOAD_TTL_S",
    "presign_put_expires_s": "HIVEMIND_PRESIGN_PUT_EXPIRES_S",
    "presign_get_expires_s": "HIVEMIND_PRESIGN_GET_EXPIRES_S",
    "runner_max_heartbeat_age_s": "HIVEMIND_RUNNER_MAX_HEARTBEAT_AGE_S",
    "max_agent_archive_bytes": "HIVEMIND_MAX_AGENT_ARCHIVE_BYTES",
    "log_level": "HIVEMIND_LOG_LEVEL",
}


class FunctionSettings(BaseModel):
    """What one deployment of the control plane allows. Immutable; build it once per process."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    store: StoreConfig = Field(default_factory=StoreConfig)
    billing_enforce_credits: bool = True
    self_serve_signup: bool = False
    # Providers this deployment can reach at all; a room may allow fewer, never more.
    allowed_llm_providers: tuple[str, ...] = ()
    long_poll_max_s: int = Field(default=20, ge=0, le=25)
    # API Gateway and Lambda cap payloads at 6 MB; bulk data goes to S3 through presigned URLs.
    max_body_bytes: int = Field(default=5 * 1024 * 1024, ge=1024, le=6 * 1024 * 1024)
    admission_extra_policies: str | None = None
    run_pending_ttl_s: int = Field(default=3600, ge=60, le=7 * 86_400)
    run_running_ttl_s: int = Field(default=3600, ge=60, le=7 * 86_400)
    run_rate_limit_per_minute: int = Field(default=30, ge=1, le=100_000)
    upload_ttl_s: int = Field(default=86_400, ge=300, le=30 * 86_400)
    presign_put_expires_s: int = Field(default=900, ge=1, le=3600)
    presign_get_expires_s: int = Field(default=300, ge=1, le=3600)
    runner_max_heartbeat_age_s: int = Field(default=120, ge=1, le=86_400)
    max_agent_archive_bytes: int = Field(default=50 * 1024 * 1024, ge=1024, le=5 * 1024**3)
    log_level: str = Field(default="INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")

    @field_validator("allowed_llm_providers")
    @classmethod
    def _providers(cls, providers: tuple[str, ...]) -> tuple[str, ...]:
        for provider in providers:
            if not re.fullmatch(_PROVIDER, provider):
                raise ValueError(f"invalid provider name {provider!r}")
        return tuple(sorted(set(providers)))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> FunctionSettings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {"store": StoreConfig.from_env(env)}
        for field, variable in ENV_VARIABLES.items():
            raw = env.get(variable)
            if raw is None or raw.strip() == "":
                continue
            values[field] = _parse(field, variable, raw.strip())
        try:
            return cls(**values)
        except ValidationError as exc:
            error = exc.errors()[0]
            field = str(error["loc"][0]) if error["loc"] else "?"
            raise InvalidInput(f"invalid setting {ENV_VARIABLES.get(field, field)}: {error['msg']}") from None


def _parse(field: str, variable: str, raw: str) -> Any:
    annotation = FunctionSettings.model_fields[field].annotation
    if annotation is bool:
        lowered = raw.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise InvalidInput(f"invalid setting {variable}: expected true or false, got {raw!r}")
    if field == "allowed_llm_providers":
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    return raw
