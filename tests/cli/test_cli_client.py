"""The API client (``hmctl.client``) and the exit codes errors map to, with a stubbed transport."""

from __future__ import annotations

import hashlib
import io
import json

import httpx
import pytest

from hivemind.errors import (
    InsufficientCredit,
    InvalidInput,
    ManifestError,
    NotFound,
    ReceiptError,
    SimulatedTeeRefused,
)
from hivemind.keys import auth_token
from hivemind.tokens import Secret, TokenKind
from hmctl.client import ApiClient
from hmctl.errors import ApiError, ExitCode, NotAccepted, ServiceUnreachable, exit_code_for

SERVICE = "https://api.example.com"


def client(handler, **options) -> ApiClient:  # type: ignore[no-untyped-def]
    return ApiClient(
        SERVICE, token="hmk_token", transport=httpx.MockTransport(handler), sleep=lambda _s: None, **options
    )


def test_bearer_token_is_the_auth_subkey_never_the_secret() -> None:
    secret = Secret.generate(TokenKind.TENANT)
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"kind": "tenant"})

    api = ApiClient.for_secret(SERVICE, secret, transport=httpx.MockTransport(handler))
    assert api.get("/v1/whoami") == {"kind": "tenant"}
    header = seen[0].headers["authorization"]
    assert header == f"Bearer {auth_token(secret)}" and secret.token() not in header


def test_error_answers_carry_the_server_code_status_and_request_id() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            410,
            json={"error": "room_deleted", "message": "room x was deleted"},
            headers={"x-request-id": "req-1"},
        )

    with pytest.raises(ApiError) as caught:
        client(handler).get("/v1/rooms/room_x")
    error = caught.value
    assert (error.http_status, error.code, error.message, error.request_id) == (
        410,
        "room_deleted",
        "room x was deleted",
        "req-1",
    )
    assert exit_code_for(error) is ExitCode.NOT_FOUND


def test_a_non_json_error_still_has_a_code() -> None:
    with pytest.raises(ApiError) as caught:
        client(lambda request: httpx.Response(502, text="<html>bad gateway</html>"), retries=0).get("/v1/x")
    assert caught.value.code == "http_502" and exit_code_for(caught.value) is ExitCode.UNAVAILABLE


def test_gets_are_retried_on_503_but_posts_are_not() -> None:
    calls = {"GET": 0, "POST": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls[request.method] += 1
        if calls[request.method] < 3:
            return httpx.Response(503, json={"error": "service_unavailable", "message": "busy"})
        return httpx.Response(200, json={"ok": True})

    api = client(handler)
    assert api.get("/v1/x") == {"ok": True} and calls["GET"] == 3
    with pytest.raises(ApiError) as caught:
        api.post("/v1/x", {})
    assert calls["POST"] == 1 and exit_code_for(caught.value) is ExitCode.UNAVAILABLE


def test_connection_errors_are_retried_then_reported_as_unreachable() -> None:
    attempts = []

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(request)
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(ServiceUnreachable) as caught:
        client(handler, retries=2).post("/v1/rooms", {})
    assert len(attempts) == 3
    assert "no answer from api.example.com" in caught.value.message
    assert exit_code_for(caught.value) is ExitCode.UNAVAILABLE


def test_a_read_timeout_on_a_post_is_not_repeated() -> None:
    attempts = []

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(request)
        raise httpx.ReadTimeout("slow", request=request)

    with pytest.raises(ServiceUnreachable):
        client(handler).post("/v1/rooms/room_x/runs", {})
    assert len(attempts) == 1


def test_presigned_upload_streams_without_the_bearer_token() -> None:
    received: dict[str, object] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        received["headers"] = dict(request.headers)
        received["body"] = request.read()
        return httpx.Response(200)

    progress: list[int] = []
    data = b"x" * (2 * 1024 * 1024 + 5)
    client(handler).upload(
        {"url": "https://bucket.example.com/k?sig=1", "headers": {"x-amz-checksum-sha256": "abc"}},
        io.BytesIO(data),
        len(data),
        progress=progress.append,
    )
    headers = received["headers"]
    assert isinstance(headers, dict)
    assert "authorization" not in headers and headers["content-length"] == str(len(data))
    assert headers["x-amz-checksum-sha256"] == "abc"
    assert received["body"] == data and sum(progress) == len(data) and len(progress) == 3


def test_download_hashes_while_streaming_and_caps_size() -> None:
    api = client(lambda request: httpx.Response(200, content=b"sealed bytes"))
    sink = io.BytesIO()
    assert api.download("https://bucket.example.com/o", sink) == hashlib.sha256(b"sealed bytes").hexdigest()
    assert sink.getvalue() == b"sealed bytes"
    with pytest.raises(ApiError, match="larger than 4 bytes"):
        api.download("https://bucket.example.com/o", io.BytesIO(), max_bytes=4)


def test_wait_for_run_long_polls_until_terminal_and_reports_each_stage() -> None:
    states = iter(
        [
            ("pending", None),
            ("running", "scope"),
            ("running", "query"),
            ("running", "query"),
            ("running", "mediator"),
            ("completed", None),
        ]
    )
    waits: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        waits.append(request.url.params.get("wait"))
        status, stage = next(states)
        return httpx.Response(200, json={"run_id": "run_a", "status": status, "stage": stage})

    seen: list[tuple[str, str | None]] = []
    final = client(handler).wait_for_run(
        "run_a", on_update=lambda view: seen.append((view["status"], view["stage"]))
    )
    assert final["status"] == "completed"
    assert seen == [
        ("pending", None),
        ("running", "scope"),
        ("running", "query"),
        ("running", "mediator"),
        ("completed", None),
    ]
    assert waits[0] is None and set(waits[1:]) == {"20"}


def test_wait_for_run_gives_up_after_its_timeout() -> None:
    now = iter(range(0, 1000, 10))
    api = client(
        lambda request: httpx.Response(200, json={"run_id": "run_a", "status": "running", "stage": "query"})
    )
    with pytest.raises(ServiceUnreachable, match="hmctl run wait run_a"):
        api.wait_for_run("run_a", timeout_s=25, clock=lambda: float(next(now)))


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ApiError(401, "credential_revoked", "revoked"), ExitCode.AUTH),
        (ApiError(403, "owner_only", "only the owner"), ExitCode.AUTH),
        (ApiError(403, "invite_widens", "narrow"), ExitCode.DENIED),
        (ApiError(403, "budget_exceeded", "budget"), ExitCode.DENIED),
        (ApiError(402, "insufficient_credit", "pay"), ExitCode.DENIED),
        (ApiError(429, "rate_limited", "slow down"), ExitCode.DENIED),
        (ApiError(404, "run_not_found", "no run"), ExitCode.NOT_FOUND),
        (ApiError(409, "signature_invalid", "stored manifest"), ExitCode.VERIFICATION),
        (ApiError(409, "ledger_invalid", "chain"), ExitCode.VERIFICATION),
        (ApiError(409, "room_exists", "taken"), ExitCode.ERROR),
        (ApiError(400, "invalid_input", "bad"), ExitCode.USAGE),
        (ApiError(500, "internal_error", "oops"), ExitCode.UNAVAILABLE),
        (ManifestError("local"), ExitCode.VERIFICATION),
        (ReceiptError("local"), ExitCode.VERIFICATION),
        (SimulatedTeeRefused("local"), ExitCode.VERIFICATION),
        (InsufficientCredit("local"), ExitCode.DENIED),
        (InvalidInput("local"), ExitCode.USAGE),
        (NotFound("local"), ExitCode.NOT_FOUND),
        (NotAccepted("local"), ExitCode.NOT_ACCEPTED),
        (ValueError("a bug"), ExitCode.ERROR),
    ],
)
def test_exit_codes(error: BaseException, code: ExitCode) -> None:
    assert exit_code_for(error) is code


def test_exit_code_numbers_are_stable() -> None:
    assert {member.name: member.value for member in ExitCode} == {
        "OK": 0,
        "ERROR": 1,
        "USAGE": 2,
        "AUTH": 3,
        "NOT_FOUND": 4,
        "VERIFICATION": 5,
        "DENIED": 6,
        "RUN_FAILED": 7,
        "UNAVAILABLE": 8,
        "NOT_ACCEPTED": 9,
    }


def test_json_bodies_are_sent_as_json() -> None:
    bodies: list[object] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(201, json={"id": 1})

    assert client(handler).post("/v1/rooms", {"a": [1, 2]}) == {"id": 1}
    assert bodies == [{"a": [1, 2]}]
