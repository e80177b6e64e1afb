"""Fuzz the API from its own OpenAPI document with schemathesis: every operation of the checked-in
``docs/openapi.json`` (a test elsewhere keeps it equal to the served one), a bounded number of examples
per operation with a fixed seed (``derandomize``), sent over HTTP to the app under uvicorn on
127.0.0.1 (loopback only; its storage is the test's moto server), as an anonymous caller and as a tenant
that owns a room. Every answer must be a non-5xx that conforms to the document (content type, body
schema).

Schemathesis' own pytest integration does not run under pytest 9, so the cases come from each
operation's Hypothesis strategy directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

pytestmark = [pytest.mark.moto_server, pytest.mark.slow]

EXAMPLES_PER_OPERATION = 5
SCHEMA = schemathesis.openapi.from_path(Path(__file__).resolve().parents[2] / "docs" / "openapi.json")
OPERATIONS = {result.ok().label: result.ok() for result in SCHEMA.get_all_operations()}


def _sendable(value: Any) -> bool:
    text = str(value)
    return text == text.strip() and all(0x20 <= ord(char) < 0x7F for char in text) and " " != text[-1:]


@pytest.fixture
def owner_token(hm_lambda: Any) -> str:
    """A tenant with a room and an invite: authenticated cases then reach past authentication."""
    alice = hm_lambda.tenant("alice")
    hm_lambda.invite(hm_lambda.room(alice))
    return alice.token


@pytest.mark.parametrize("label", sorted(OPERATIONS))
def test_fuzzed_requests_never_get_a_server_error(label: str, http_api: Any, owner_token: str) -> None:
    operation = OPERATIONS[label]
    client = http_api.client
    base_url = str(client.base_url)
    assert base_url.startswith("http://127.0.0.1:")

    @given(case=operation.as_strategy())
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    def fuzz(case: Any) -> None:
        if case.query and "wait" in case.query:
            case.query["wait"] = 0  # a long poll holds a request up to 20 s; its bounds are tested elsewhere
        for token in (None, owner_token):
            kwargs = case.as_transport_kwargs(base_url=base_url)
            # Header values HTTP cannot carry never reach a server; the client would refuse to send them.
            headers = {name: value for name, value in kwargs.pop("headers").items() if _sendable(value)}
            if token is not None:
                headers["Authorization"] = f"Bearer {token}"
            kwargs.pop("cookies", None)
            response = client.request(headers=headers, **kwargs)
            assert response.status_code < 500, (label, response.status_code, response.text[:300])
            case.validate_response(response, checks=[content_type_conformance, response_schema_conformance])

    fuzz()
