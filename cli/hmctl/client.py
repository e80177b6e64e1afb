"""The HTTP client of the Hivemind API (httpx), used by every command and by scripts.

- Authentication: ``Authorization: Bearer <prefix>_<base32(HKDF(secret, "auth"))>`` from a
  :class:`~hivemind.tokens.Secret` (:meth:`ApiClient.for_secret`); the secret itself never leaves.
- Errors: an error answer ``{"error": code, "message": ...}`` raises :class:`~hmctl.errors.ApiError`
  with the server's status and code; no answer at all raises
  :class:`~hmctl.errors.ServiceUnreachable`. ``hmctl.errors.exit_code_for`` turns either into an exit code.
- Retries: GETs (idempotent) are retried on network errors, 502/503/504 and 429, with backoff; any
  request is retried when the connection was never made. Other requests are sent once: the run
  submission carries its own idempotency key, so a caller may repeat it safely.
- Presigned uploads and downloads go straight to the bucket, without the bearer token, streaming in
  chunks with an optional progress callback (a 10 GB item never sits in memory).
- :meth:`ApiClient.wait_for_run` long-polls ``GET /v1/runs/{id}?wait=N`` until the run finishes.

Usage::

    with ApiClient.for_secret("https://api.example.com", secret) as api:
        me = api.get("/v1/whoami")
        run = api.wait_for_run(run_id, on_update=lambda view: print(view["stage"]))

Tests pass ``transport=httpx.MockTransport(handler)`` to exercise everything without a network.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, BinaryIO, Self

import httpx

from hivemind.keys import auth_token
from hivemind.tokens import Secret
from hmctl import __version__
from hmctl.errors import ApiError, ServiceUnreachable

DEFAULT_TIMEOUT_S = 30.0
LONG_POLL_S = 20
UPLOAD_CHUNK = 1024 * 1024
_RETRY_STATUSES = frozenset({429, 502, 503, 504})
_BACKOFF_S = (0.5, 1.0, 2.0, 4.0)
_TERMINAL = frozenset({"completed", "failed", "expired"})

Progress = Callable[[int], None]


class ApiClient:
    """One service, one credential. Methods return the parsed JSON body of a successful answer."""

    def __init__(
        self,
        service: str,
        *,
        token: str | None = None,
        payer_token: str | None = None,
        transport: httpx.BaseTransport | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retries: int = 3,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.service = service.rstrip("/")
        headers = {"user-agent": f"hmctl/{__version__}", "accept": "application/json"}
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        if payer_token is not None:
            headers["x-hivemind-payer"] = payer_token
        self._http = httpx.Client(
            base_url=self.service,
            headers=headers,
            transport=transport,
            timeout=timeout_s,
            follow_redirects=False,
        )
        # Presigned URLs carry their own authorization: never send them the bearer token.
        self._bucket = httpx.Client(transport=transport, timeout=timeout_s, follow_redirects=False)
        self._retries = retries
        self._sleep = sleep

    @classmethod
    def for_secret(
        cls, service: str, secret: Secret | None, *, payer: Secret | None = None, **options: Any
    ) -> ApiClient:
        """A client authenticated by ``secret``'s auth token (``None``: unauthenticated)."""
        return cls(
            service,
            token=auth_token(secret) if secret is not None else None,
            payer_token=auth_token(payer) if payer is not None else None,
            **options,
        )

    def close(self) -> None:
        self._http.close()
        self._bucket.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- requests ------------------------------------------------------------------------------------

    def _send(self, client: httpx.Client, request: httpx.Request, *, idempotent: bool) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = client.send(request)
            except httpx.ConnectError as exc:
                # Nothing reached the service: any request may be sent again.
                if attempt >= self._retries:
                    raise self._unreachable(request, exc) from None
            except httpx.TransportError as exc:
                if not idempotent or attempt >= self._retries:
                    raise self._unreachable(request, exc) from None
            else:
                if not (idempotent and response.status_code in _RETRY_STATUSES and attempt < self._retries):
                    return response
                response.close()
            self._sleep(_BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)])
            attempt += 1

    def _unreachable(self, request: httpx.Request, exc: httpx.TransportError) -> ServiceUnreachable:
        host = request.url.host or str(request.url)
        return ServiceUnreachable(
            f"no answer from {host} ({exc.__class__.__name__}: {exc or 'no details'}); check the service URL "
            "and your network, then retry"
        )

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> httpx.Response:
        """Send one API request; raise ApiError for an error answer. Returns the raw response."""
        query = {key: value for key, value in (params or {}).items() if value is not None}
        timeout = httpx.Timeout(timeout_s) if timeout_s is not None else httpx.USE_CLIENT_DEFAULT
        request = self._http.build_request(method, path, json=json, params=query, timeout=timeout)
        response = self._send(self._http, request, idempotent=method in ("GET", "HEAD"))
        if response.status_code >= 400:
            raise api_error(response)
        return response

    def get(
        self, path: str, *, params: Mapping[str, Any] | None = None, timeout_s: float | None = None
    ) -> Any:
        return _json_of(self.request("GET", path, params=params, timeout_s=timeout_s))

    def post(self, path: str, json: Any = None) -> Any:
        return _json_of(self.request("POST", path, json=json if json is not None else {}))

    def put(self, path: str, json: Any) -> Any:
        return _json_of(self.request("PUT", path, json=json))

    def delete(self, path: str, *, params: Mapping[str, Any] | None = None) -> Any:
        return _json_of(self.request("DELETE", path, params=params))

    def get_all(
        self, path: str, key: str, *, params: Mapping[str, Any] | None = None, limit: int = 100
    ) -> list[Any]:
        """Every entry of a paged listing ``{key: [...], "cursor": ...}``."""
        entries: list[Any] = []
        cursor: str | None = None
        while True:
            page = self.get(path, params={**(params or {}), "cursor": cursor, "limit": limit})
            entries.extend(page.get(key, []))
            cursor = page.get("cursor")
            if not cursor:
                return entries

    # --- runs ----------------------------------------------------------------------------------------

    def wait_for_run(
        self,
        run_id: str,
        *,
        on_update: Callable[[dict[str, Any]], None] | None = None,
        timeout_s: float | None = None,
        wait_s: int = LONG_POLL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> dict[str, Any]:
        """Long-poll the run until it is completed, failed or expired; ``on_update`` sees each change.

        Returns the last run view; raises ServiceUnreachable if ``timeout_s`` passes first.
        """
        deadline = clock() + timeout_s if timeout_s is not None else None
        view: dict[str, Any] = self.get(f"/v1/runs/{run_id}")
        last: tuple[Any, Any] | None = None
        while True:
            state = (view.get("status"), view.get("stage"))
            if state != last and on_update is not None:
                on_update(view)
            last = state
            if view.get("status") in _TERMINAL:
                return view
            remaining = None if deadline is None else deadline - clock()
            if remaining is not None and remaining <= 0:
                raise ServiceUnreachable(
                    f"run {run_id} is still {view.get('status')} after {timeout_s:.0f} s; follow it later "
                    f"with `hmctl run wait {run_id}`"
                )
            wait = wait_s if remaining is None else max(1, min(wait_s, int(remaining)))
            view = self.get(f"/v1/runs/{run_id}", params={"wait": wait}, timeout_s=wait + DEFAULT_TIMEOUT_S)

    # --- presigned transfers -------------------------------------------------------------------------

    def upload(
        self, upload: Mapping[str, Any], source: BinaryIO, size: int, *, progress: Progress | None = None
    ) -> None:
        """PUT ``size`` bytes from ``source`` to a presigned upload ``{url, headers}``, streaming."""

        def chunks() -> Iterator[bytes]:
            sent = 0
            while sent < size:
                chunk = source.read(min(UPLOAD_CHUNK, size - sent))
                if not chunk:
                    raise ValueError(f"the upload source ended after {sent} of {size} bytes")
                sent += len(chunk)
                if progress is not None:
                    progress(len(chunk))
                yield chunk

        headers = {str(name): str(value) for name, value in dict(upload.get("headers") or {}).items()}
        headers["Content-Length"] = str(size)
        request = self._bucket.build_request("PUT", str(upload["url"]), headers=headers, content=chunks())
        response = self._send(self._bucket, request, idempotent=False)
        if response.status_code >= 300:
            raise ApiError(
                response.status_code,
                "upload_refused",
                f"the bucket refused the upload ({response.status_code}): {response.text[:300]}",
            )

    def download(
        self, url: str, sink: BinaryIO, *, max_bytes: int | None = None, progress: Progress | None = None
    ) -> str:
        """Stream a presigned GET into ``sink``; return the hex SHA-256 of what was written."""
        digest = hashlib.sha256()
        request = self._bucket.build_request("GET", url)
        attempt = 0
        while True:
            try:
                response = self._bucket.send(request, stream=True)
                break
            except httpx.TransportError as exc:
                if attempt >= self._retries:
                    raise self._unreachable(request, exc) from None
                self._sleep(_BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)])
                attempt += 1
        try:
            if response.status_code >= 300:
                response.read()
                raise ApiError(
                    response.status_code,
                    "download_refused",
                    f"the bucket refused the download ({response.status_code}); the link may have expired, "
                    "so run the command again",
                )
            written = 0
            for chunk in response.iter_bytes(UPLOAD_CHUNK):
                written += len(chunk)
                if max_bytes is not None and written > max_bytes:
                    raise ApiError(
                        413, "download_too_large", f"the download is larger than {max_bytes} bytes"
                    )
                digest.update(chunk)
                sink.write(chunk)
                if progress is not None:
                    progress(len(chunk))
        finally:
            response.close()
        return digest.hexdigest()


def _json_of(response: httpx.Response) -> Any:
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        raise ApiError(
            response.status_code, "invalid_response", "the service answered with something that is not JSON"
        ) from None


def api_error(response: httpx.Response) -> ApiError:
    """The :class:`ApiError` of an error answer (the service's code, or ``http_<status>``)."""
    request_id = response.headers.get("x-request-id")
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        message = str(body.get("message") or body["error"])
        details = body.get("details") if isinstance(body.get("details"), dict) else None
        return ApiError(response.status_code, body["error"], message, details=details, request_id=request_id)
    text = response.text[:200].strip() or response.reason_phrase
    return ApiError(
        response.status_code, f"http_{response.status_code}", f"HTTP {response.status_code}: {text}"
    )
