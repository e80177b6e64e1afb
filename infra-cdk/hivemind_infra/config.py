"""Deployment environments (dev, prod, ...) read from the ``hivemind:environments`` context of cdk.json.

This module imports no CDK code, so ``scripts/build_layers.py`` can read the Lambda platform constants
without loading the jsii runtime. Every value is validated here: a typo in cdk.json fails the synth with
the field's name instead of producing a stack with a silent default.

The switches the functions read at run time (credits enforcement, self-serve signup, allowed
providers) are turned into ``HIVEMIND_*`` variables by :meth:`EnvironmentConfig.function_environment`,
which also parses them with the functions' own :class:`FunctionSettings`, so the stack can only deploy
values the functions accept.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hivemind.errors import InvalidInput
from hivemind.store.schema import PREFIX_PATTERN, RUN_OBJECTS_TTL_DAYS
from hivemind_functions.settings import ENV_VARIABLES, FunctionSettings

# The Lambda runtime and the platform the dependency layer is built for; both places read these.
LAMBDA_PYTHON_VERSION = "3.12"
LAMBDA_PLATFORM = "manylinux2014_x86_64"

CONTEXT_KEY = "hivemind:environments"
CDK_JSON = Path(__file__).resolve().parent.parent / "cdk.json"

# CloudWatch Logs accepts only these retention periods (days).
LOG_RETENTION_DAYS = frozenset(
    {1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653}
)
_PRINCIPAL_ARN = re.compile(
    r"^arn:aws[a-z-]*:iam::\d{12}:(root|user/[A-Za-z0-9+=,.@/_-]+|role/[A-Za-z0-9+=,.@/_-]+)$"
)
_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,255}\.[a-z]{2,}$")


class ConfigError(ValueError):
    """cdk.json does not describe a valid environment."""


class EnvironmentConfig(BaseModel):
    """One deployment of the whole stack."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9]{1,15}$")
    # Resource names are <prefix>-<role> (hivemind.store.schema.resource_name).
    prefix: str
    account: str | None = Field(default=None, pattern=r"^\d{12}$")
    region: str = Field(pattern=r"^[a-z]{2}(-[a-z]+)+-\d$")
    # S3 names are global: default <prefix>-blobs-<account>-<region>.
    bucket_name: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")

    # --- switches the functions read (FunctionSettings) ---
    billing_enforce_credits: bool = True
    self_serve_signup: bool = False
    allowed_llm_providers: tuple[str, ...] = ()

    # --- storage ---
    artifact_ttl_days: int = Field(default=RUN_OBJECTS_TTL_DAYS, ge=1, le=3650)
    deletion_protection: bool = True
    access_log_retention_days: int = Field(default=365, ge=1, le=3650)

    # --- runners (dstack CVMs outside AWS) ---
    runner_count: int = Field(default=1, ge=1, le=100)
    # The runners' heartbeat interval (HIVEMIND_RUNNER_HEARTBEAT_S of the runner); the alarm counts beats.
    runner_heartbeat_s: int = Field(default=30, ge=5, le=300)
    # Principals allowed to assume the runner role; empty: any principal of this account whose own
    # IAM policy allows sts:AssumeRole on it (the account root is trusted).
    runner_trusted_principals: tuple[str, ...] = ()
    runner_external_id: str | None = Field(
        default=None, min_length=2, max_length=1224, pattern=r"^[A-Za-z0-9+=,.@:/_-]+$"
    )

    # --- API and operations ---
    api_throttle_rate: int = Field(default=50, ge=1, le=10_000)
    api_throttle_burst: int = Field(default=100, ge=1, le=5_000)
    log_retention_days: int = 90
    janitor_interval_minutes: int = Field(default=10, ge=1, le=1440)
    alarm_email: str | None = None
    api_5xx_alarm_threshold: int = Field(default=5, ge=1)
    runs_backlog_alarm_age_s: int = Field(default=900, ge=60)

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not PREFIX_PATTERN.fullmatch(value) or "--" in value:
            raise ValueError("prefix must be 3-40 lowercase letters, digits and single hyphens")
        return value

    @field_validator("runner_trusted_principals")
    @classmethod
    def _principals(cls, principals: tuple[str, ...]) -> tuple[str, ...]:
        for arn in principals:
            if not _PRINCIPAL_ARN.fullmatch(arn):
                raise ValueError(f"{arn!r} is not an IAM account, user or role ARN")
        return principals

    @field_validator("log_retention_days")
    @classmethod
    def _retention(cls, value: int) -> int:
        if value not in LOG_RETENTION_DAYS:
            raise ValueError(f"CloudWatch Logs retention must be one of {sorted(LOG_RETENTION_DAYS)}")
        return value

    @field_validator("alarm_email")
    @classmethod
    def _email(cls, value: str | None) -> str | None:
        if value is not None and not _EMAIL.fullmatch(value):
            raise ValueError("alarm_email is not an email address")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> EnvironmentConfig:
        if self.api_throttle_burst < self.api_throttle_rate:
            raise ValueError("api_throttle_burst must be at least api_throttle_rate")
        # Fails here, at synth, when the functions would refuse the values at start-up.
        try:
            self.function_settings()
        except InvalidInput as exc:
            raise ValueError(exc.message) from None
        return self

    @property
    def stack_name(self) -> str:
        return f"hivemind-{self.name}"

    def function_environment(self) -> dict[str, str]:
        """The ``HIVEMIND_*`` switches every function gets (storage coordinates are added by the stack)."""
        return {
            ENV_VARIABLES["billing_enforce_credits"]: str(self.billing_enforce_credits).lower(),
            ENV_VARIABLES["self_serve_signup"]: str(self.self_serve_signup).lower(),
            ENV_VARIABLES["allowed_llm_providers"]: ",".join(self.allowed_llm_providers),
        }

    def function_settings(self) -> FunctionSettings:
        environ = {"HIVEMIND_PREFIX": self.prefix, "HIVEMIND_REGION": self.region}
        return FunctionSettings.from_env({**environ, **self.function_environment()})


def load_environments(context: Mapping[str, Any]) -> dict[str, EnvironmentConfig]:
    """Every environment under ``hivemind:environments`` in a CDK context mapping, by name."""
    raw = context.get(CONTEXT_KEY)
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"context {CONTEXT_KEY!r} must map environment names to settings")
    environments: dict[str, EnvironmentConfig] = {}
    prefixes: set[str] = set()
    for name, values in raw.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{CONTEXT_KEY}.{name} must be an object")
        try:
            config = EnvironmentConfig(name=name, **values)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"]) or "(environment)"
            raise ConfigError(f"{CONTEXT_KEY}.{name}.{where}: {error['msg']}") from None
        except ValueError as exc:
            raise ConfigError(f"{CONTEXT_KEY}.{name}: {exc}") from None
        if config.prefix in prefixes:
            raise ConfigError(f"{CONTEXT_KEY}.{name}: prefix {config.prefix!r} is used by two environments")
        prefixes.add(config.prefix)
        environments[name] = config
    return environments


def cdk_json_context(path: Path = CDK_JSON) -> dict[str, Any]:
    """The ``context`` block of cdk.json (what ``cdk synth`` would pass; app.py reads it itself)."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    context = document.get("context")
    if not isinstance(context, dict):
        raise ConfigError(f"{path} has no context object")
    return context
