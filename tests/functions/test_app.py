"""The app itself: the Lambda entry point, the body gate, error mapping, OpenAPI."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from fastapi import APIRouter

from hivemind.errors import Conflict
from hivemind_functions.api.app import create_app
from hivemind_functions.openapi import DEFAULT_PATH, openapi_document, render
from hivemind_functions.settings import FunctionSettings

REPO = Path(__file__).resolve().parents[2]


def test_lambda_events_carry_the_request_and_the_request_id(lambda_api, hm) -> None:
    alice = hm.tenant()
    response = lambda_api.get("/v1/whoami", token=alice.token)
    assert response.status == 200
    assert lambda_api.last_event["version"] == "2.0"
    # Under Mangum the request id is the Lambda invocation's, so logs and answers line up.
    assert len(response.headers["x-request-id"]) == 36
    assert response.headers["cache-control"] == "no-store"


def test_http_answers_carry_a_request_id(http_api) -> None:
    response = http_api.get("/v1/healthz")
    assert response.status == 200 and len(response.headers["x-request-id"]) == 32


def test_unknown_route_and_wrong_method(api) -> None:
    response = api.get("/v1/nothing-here")
    assert (response.status, response.error) == (404, "not_found")
    response = api.put("/v1/healthz")
    assert (response.status, response.error) == (405, "method_not_allowed")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"name": "a", "name": "b"}', "repeats a key"),
        (b'{"size": NaN}', "NaN"),
        (b'{"size": Infinity}', "Infinity"),
        (b'{"name": "\\ud800"}', "surrogate"),
        (b'{"name": "caf\xe9"}', "not UTF-8"),
        (b"[" * 100 + b"]" * 100, "deeper"),
    ],
)
def test_malformed_json_is_400_before_any_route(api, hm, body: bytes, message: str) -> None:
    alice = hm.tenant()
    headers = {"content-type": "application/json"}
    response = api.post("/v1/rooms", token=alice.token, content=body, headers=headers)
    assert (response.status, response.error) == (400, "invalid_json")
    assert message in response.json()["message"]


def test_paired_surrogates_and_other_unicode_are_fine(lambda_api, hm) -> None:
    alice = hm.tenant()
    room = hm.room(alice)
    body = hm.invite_body(hm.invite_key(room), room.dek)
    # \ud83d\udc1d is U+1F41D written as an escaped surrogate pair: valid JSON for one character.
    text = json.dumps({**body, "label": "PLACEHOLDER"})
    text = text.replace("PLACEHOLDER", "bee \\ud83d\\udc1d \u00e9t\u00e9")
    response = lambda_api.post(
        f"/v1/rooms/{room.room_id}/invites",
        token=alice.token,
        content=text.encode(),
        headers={"content-type": "application/json"},
    )
    assert response.ok(201)["label"] == "bee \U0001f41d \u00e9t\u00e9"


def test_bidi_and_control_characters_are_refused_in_names(lambda_api, hm) -> None:
    alice = hm.tenant()
    room = hm.room(alice)
    for label in ("abc\u202edef", "tab\there", "zero\u200bwidth", " padded"):
        body = {**hm.invite_body(hm.invite_key(room), room.dek), "label": label}
        response = lambda_api.post(f"/v1/rooms/{room.room_id}/invites", token=alice.token, json=body)
        assert (response.status, response.error) == (400, "invalid_input"), label
        assert response.json()["details"] == {"field": "label"}


def test_validation_errors_name_the_field_but_never_echo_the_value(api, hm) -> None:
    alice = hm.tenant()
    secret_looking = "s3cr3t-" * 20
    body = {"signed_manifest": {}, "owner_wrap": secret_looking}
    response = api.post("/v1/rooms", token=alice.token, json=body)
    assert (response.status, response.error) == (400, "invalid_input")
    assert secret_looking not in response.body.decode()
    assert "pydantic" not in response.body.decode()


class TestBodyLimit:
    @pytest.fixture
    def function_settings(self, store) -> FunctionSettings:
        return FunctionSettings(store=store.config, max_body_bytes=4096)

    def test_oversized_bodies_are_413(self, api, hm) -> None:
        alice = hm.tenant()
        response = api.post("/v1/rooms", token=alice.token, json={"pad": "x" * 5000})
        assert (response.status, response.error) == (413, "payload_too_large")
        response = api.post("/v1/rooms", token=alice.token, json={"pad": "x" * 3000})
        assert response.status == 400  # under the limit: the route's own validation answers

    def test_a_lying_content_length_does_not_bypass_the_limit(self, http_api, hm) -> None:
        alice = hm.tenant()
        url = urlsplit(str(http_api.client.base_url))
        body = b'{"pad": "' + b"x" * 8000 + b'"}'
        request = (
            (
                f"POST /v1/rooms HTTP/1.1\r\nHost: {url.hostname}\r\nAuthorization: Bearer {alice.token}\r\n"
                "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            ).encode()
            + f"{len(body):x}\r\n".encode()
            + body
            + b"\r\n0\r\n\r\n"
        )
        with socket.create_connection((url.hostname, url.port), timeout=10) as connection:
            connection.sendall(request)
            answer = b""
            while chunk := connection.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 413")
        assert b"payload_too_large" in answer


def test_unexpected_errors_are_500_without_details(services, lambda_client_for) -> None:
    app = create_app(services)
    router = APIRouter()

    @router.get("/v1/boom")
    def boom() -> None:
        raise RuntimeError("secret internal detail")

    @router.get("/v1/conflict")
    def conflict() -> None:
        raise Conflict("it changed", code="something_changed")

    app.include_router(router)
    client = lambda_client_for(app)
    response = client.get("/v1/boom")
    assert (response.status, response.error) == (500, "internal_error")
    assert "secret internal detail" not in response.body.decode()
    assert response.headers["x-request-id"] in response.json()["message"]
    response = client.get("/v1/conflict")
    assert response.status == 409
    assert response.json() == {"error": "something_changed", "message": "it changed"}


def test_bad_settings_answer_500_without_details(monkeypatch, lambda_client_for) -> None:
    monkeypatch.setenv("HIVEMIND_MAX_BODY_BYTES", "lots")
    client = lambda_client_for(create_app())
    response = client.get("/v1/healthz")
    assert (response.status, response.error) == (500, "internal_error")
    assert "HIVEMIND" not in response.body.decode()


def test_handler_import_is_cheap_and_reads_no_settings() -> None:
    # A broken setting must not break the import (Lambda init); it surfaces on the first request.
    script = textwrap.dedent(
        """
        import os, time
        os.environ["HIVEMIND_MAX_BODY_BYTES"] = "not a number"
        started = time.perf_counter()
        from hivemind_functions.api.handler import handler
        elapsed = time.perf_counter() - started
        print(elapsed)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert float(result.stdout.strip()) < 2.0, result.stdout


def test_openapi_is_served_and_checked_in_current() -> None:
    document = openapi_document()
    assert document["openapi"].startswith("3.")
    checked_in = DEFAULT_PATH.read_text(encoding="utf-8") if DEFAULT_PATH.exists() else ""
    assert checked_in == render(document), (
        "docs/openapi.json is out of date: run `python -m hivemind_functions.openapi`"
    )


def test_openapi_route_serves_the_same_document(api) -> None:
    assert api.get("/v1/openapi.json").ok() == json.loads(render(openapi_document()))
