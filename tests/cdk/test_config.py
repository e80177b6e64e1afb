"""Environment configuration from cdk.json and the dependency-layer builder's inputs (no synth: fast)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from typing import Any

import pytest

from hivemind_functions.settings import FunctionSettings
from hivemind_infra.config import (
    CONTEXT_KEY,
    LAMBDA_PLATFORM,
    LAMBDA_PYTHON_VERSION,
    ConfigError,
    cdk_json_context,
    load_environments,
)

from .conftest import INFRA, REPO


def _context(**overrides: Any) -> dict[str, Any]:
    base = {"prefix": "hm-test", "region": "eu-west-1"}
    return {CONTEXT_KEY: {"test": {**base, **overrides}}}


def test_cdk_json_defines_dev_and_prod_with_their_switches() -> None:
    environments = load_environments(cdk_json_context())
    assert set(environments) == {"dev", "prod"}
    dev, prod = environments["dev"], environments["prod"]
    assert prod.deletion_protection and not dev.deletion_protection
    assert prod.billing_enforce_credits and not dev.billing_enforce_credits
    assert dev.self_serve_signup and not prod.self_serve_signup
    assert prod.stack_name == "hivemind-prod" and dev.stack_name == "hivemind-dev"
    assert prod.prefix != dev.prefix
    assert prod.artifact_ttl_days == 30 and dev.artifact_ttl_days == 7


def test_switches_become_the_variables_the_functions_parse() -> None:
    [config] = load_environments(
        _context(
            billing_enforce_credits=False,
            self_serve_signup=True,
            allowed_llm_providers=["openai", "anthropic"],
        )
    ).values()
    environment = config.function_environment()
    assert environment == {
        "HIVEMIND_BILLING_ENFORCE_CREDITS": "false",
        "HIVEMIND_SELF_SERVE_SIGNUP_ENABLED": "true",
        "HIVEMIND_ALLOWED_LLM_PROVIDERS": "openai,anthropic",
    }
    settings = FunctionSettings.from_env({**environment, "HIVEMIND_PREFIX": "hm-test"})
    assert settings.billing_enforce_credits is False
    assert settings.self_serve_signup is True
    assert settings.allowed_llm_providers == ("anthropic", "openai")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"artifact_ttl_days": 0}, "artifact_ttl_days"),
        ({"prefix": "Bad_Prefix"}, "prefix"),
        ({"region": "mars"}, "region"),
        ({"log_retention_days": 45}, "log_retention_days"),
        ({"runner_trusted_principals": ["arn:aws:iam::123:user/x"]}, "runner_trusted_principals"),
        ({"runner_trusted_principals": ["*"]}, "runner_trusted_principals"),
        ({"runner_external_id": "has spaces"}, "runner_external_id"),
        ({"alarm_email": "not-an-address"}, "alarm_email"),
        ({"runner_count": 0}, "runner_count"),
        ({"bucket_name": "Upper_Case"}, "bucket_name"),
        ({"deletion_protecion": True}, "deletion_protecion"),
    ],
)
def test_a_bad_value_fails_naming_its_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_environments(_context(**overrides))
    assert f"{CONTEXT_KEY}.test.{field}" in str(caught.value)


def test_values_the_functions_would_refuse_fail_at_synth() -> None:
    with pytest.raises(ConfigError, match="HIVEMIND_ALLOWED_LLM_PROVIDERS"):
        load_environments(_context(allowed_llm_providers=["Not A Provider"]))
    with pytest.raises(ConfigError, match="api_throttle_burst"):
        load_environments(_context(api_throttle_rate=100, api_throttle_burst=10))


def test_two_environments_cannot_share_a_prefix() -> None:
    context = {
        CONTEXT_KEY: {
            "alpha": {"prefix": "same", "region": "us-east-1"},
            "beta": {"prefix": "same", "region": "us-east-1"},
        }
    }
    with pytest.raises(ConfigError, match="used by two environments"):
        load_environments(context)


def test_missing_environments_are_an_error() -> None:
    with pytest.raises(ConfigError):
        load_environments({})


def _build_layers_module() -> Any:
    spec = importlib.util.spec_from_file_location("build_layers", INFRA / "scripts" / "build_layers.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layer_holds_the_server_dependencies_and_not_the_cli_ones() -> None:
    build_layers = _build_layers_module()
    names = {
        build_layers.requirement_name(req)
        for req in build_layers.server_requirements(REPO / "pyproject.toml")
    }
    assert {
        "fastapi",
        "mangum",
        "aws-lambda-powertools",
        "cryptography",
        "pydantic",
        "boto3",
        "rfc8785",
    } <= names
    assert not names & {"typer", "rich", "uvicorn"}
    assert (LAMBDA_PLATFORM, LAMBDA_PYTHON_VERSION) == ("manylinux2014_x86_64", "3.12")


def test_layer_versions_are_pinned_to_the_tested_environment() -> None:
    build_layers = _build_layers_module()
    pins = dict(line.split("==", 1) for line in build_layers.installed_constraints())
    assert "hmctl" not in pins
    assert pins["pydantic"] == importlib.metadata.version("pydantic")
    assert pins["cryptography"] == importlib.metadata.version("cryptography")


def test_requirement_names_are_canonical() -> None:
    build_layers = _build_layers_module()
    assert build_layers.requirement_name("aws_lambda.Powertools>=3") == "aws-lambda-powertools"
    assert build_layers.requirement_name("pydantic>=2.7,<3") == "pydantic"
    with pytest.raises(SystemExit):
        build_layers.requirement_name(">=1")
