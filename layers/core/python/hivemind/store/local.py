"""A moto server for the local stack and the tests, with DynamoDB made as atomic as the real one.

moto evaluates a conditional write or a transaction in several unsynchronised steps (and rolls a failed
transaction back by restoring a copy of whole tables), so two concurrent requests can both pass a
condition or undo each other's writes. Real DynamoDB serialises conflicting writes. This server
therefore runs DynamoDB requests one at a time; S3 and SQS stay concurrent, so SQS long polls and large
uploads do not block the tables.

Imports moto, which only the local stack and the tests install (not the Lambda layer).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from moto.moto_server.threaded_moto_server import ThreadedMotoServer
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class _SerialDynamoDB:
    """WSGI middleware: one DynamoDB request at a time (recognised by its ``X-Amz-Target`` header)."""

    def __init__(self, app: WsgiApp) -> None:
        self._app = app
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if not environ.get("HTTP_X_AMZ_TARGET", "").startswith("DynamoDB_"):
            return self._app(environ, start_response)
        with self._lock:
            # Materialise the body inside the lock: the backend does its work while producing it.
            return list(self._app(environ, start_response))


class LocalMotoServer(ThreadedMotoServer):
    """``ThreadedMotoServer`` on ``host`` (loopback by default) and a free port, serialising DynamoDB."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, log_requests: bool = False) -> None:
        super().__init__(ip_address=host, port=port, verbose=False)
        if not log_requests:
            # werkzeug logs every request at INFO; the local stack and tests only want errors.
            logging.getLogger("werkzeug").setLevel(logging.WARNING)

    def _server_entry(self) -> None:
        app = _SerialDynamoDB(DomainDispatcherApplication(create_backend_app))
        self._server = make_server(
            self._ip_address, self._port, app, True, request_handler=MotoRequestHandler
        )
        self._server_ready_event.set()
        self._server.serve_forever()

    @property
    def endpoint_url(self) -> str:
        host, port = self.get_host_and_port()
        return f"http://{host}:{port}"
