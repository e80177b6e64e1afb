"""HTTP/1.1 over the bridge's Unix socket, with bounded responses and errors mapped to exceptions.

One connection per call: calls are few and short, and a fresh connection can never carry state from a
previous call that failed half-way.
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any

from .errors import BridgeError, BridgeUnavailable, ProtocolError, error_from_response

DEFAULT_TIMEOUT_S = 300.0
DEFAULT_MAX_RESPONSE_BYTES = 16 * 1024 * 1024
_ERROR_SNIPPET_CHARS = 500


class UnixHTTPConnection(http.client.HTTPConnection):
    """An HTTPConnection whose transport is a Unix stream socket instead of TCP."""

    def __init__(self, socket_path: str, *, timeout: float):
        # The host only fills the Host header; nothing is resolved.
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _reject_constant(name: str) -> Any:
    raise ProtocolError(f"the bridge sent the non-JSON number {name}")


def decode_json(raw: bytes, where: str) -> Any:
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"{where}: the response is not JSON ({exc})") from None


def encode_json(body: Any) -> bytes:
    """Compact UTF-8 JSON; NaN and infinities are refused here rather than sent as invalid JSON."""
    return json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


class Transport:
    """Sends one request per call to the bridge and returns the parsed JSON body, or raises."""

    def __init__(self, socket_path: str, session: str, *, timeout: float, max_response_bytes: int):
        self.socket_path = socket_path
        self._session = session
        self.timeout = timeout
        self.max_response_bytes = max_response_bytes

    def __repr__(self) -> str:
        # The session token is a credential for this run: never in reprs or tracebacks.
        return f"Transport(socket_path={self.socket_path!r})"

    def call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        raw_body: bytes | None = None,
        content_type: str = "application/json",
    ) -> Any:
        """Send a request; return the decoded JSON of a 2xx answer, raise the mapped BridgeError otherwise."""
        where = f"{method} {path}"
        body = encode_json(json_body) if json_body is not None else raw_body
        headers = {"Authorization": f"Bearer {self._session}", "Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        status, raw = self._exchange(method, path, body, headers, where)
        if 200 <= status < 300:
            return decode_json(raw, where)
        raise self._error(status, raw, where)

    def _exchange(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str], where: str
    ) -> tuple[int, bytes]:
        connection = UnixHTTPConnection(self.socket_path, timeout=self.timeout)
        try:
            try:
                connection.connect()
            except FileNotFoundError:
                raise BridgeUnavailable(f"the bridge socket {self.socket_path} does not exist") from None
            except ConnectionRefusedError:
                raise BridgeUnavailable(f"the bridge socket {self.socket_path} refuses connections") from None
            except OSError as exc:
                raise BridgeUnavailable(
                    f"cannot connect to the bridge at {self.socket_path}: {exc}"
                ) from None
            try:
                connection.request(method, path, body=body, headers=headers)
                response = connection.getresponse()
                declared = response.getheader("Content-Length")
                if declared is not None and declared.isdigit() and int(declared) > self.max_response_bytes:
                    raise ProtocolError(
                        f"{where}: the response is {int(declared)} bytes, over the "
                        f"{self.max_response_bytes}-byte limit",
                        status=response.status,
                    )
                raw = response.read(self.max_response_bytes + 1)
            except TimeoutError:
                raise BridgeUnavailable(f"{where}: the bridge did not answer in {self.timeout:g}s") from None
            except http.client.HTTPException as exc:
                raise ProtocolError(f"{where}: malformed HTTP from the bridge ({exc!r})") from None
            except OSError as exc:
                raise BridgeUnavailable(f"{where}: the bridge connection failed: {exc}") from None
            if len(raw) > self.max_response_bytes:
                raise ProtocolError(
                    f"{where}: the response exceeds the {self.max_response_bytes}-byte limit",
                    status=response.status,
                )
            return response.status, raw
        finally:
            connection.close()

    @staticmethod
    def _error(status: int, raw: bytes, where: str) -> BridgeError:
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            body = None
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            message = body.get("message")
            text = message if isinstance(message, str) else f"{where} failed"
            return error_from_response(status, body["error"], text)
        snippet = raw[:_ERROR_SNIPPET_CHARS].decode("utf-8", errors="replace")
        return error_from_response(status, f"http_{status}", f"{where} failed with HTTP {status}: {snippet}")
