"""The control plane on one machine: ``python -m hivemind_functions.local`` (the local stack, DESIGN §14).

One process runs what AWS runs as three functions, with the same code:

- the API: the FastAPI app of :func:`hivemind_functions.api.app.create_app`, served by uvicorn on a
  loopback address (the local stack speaks plain HTTP, so it never listens anywhere else);
- the settle worker: :meth:`hivemind_functions.settle.Settler.serve` long-polls the settlements queue and
  settles each message exactly as the Lambda handler does (failed messages return to the queue and
  reach its DLQ after the maximum receives);
- the janitor: :func:`hivemind_functions.janitor.handler` on a timer, as the EventBridge schedule calls it.

Configuration is the functions' own ``HIVEMIND_*`` environment (storage coordinates and switches). With
``--ready-file`` the bound port is written there as JSON once the socket listens, so a supervisor can ask
for port 0 and learn the port without racing for it. SIGTERM or SIGINT stops all three.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from hivemind.errors import HivemindError
from hivemind_functions import janitor, settle
from hivemind_functions.api.app import create_app
from hivemind_functions.settings import FunctionSettings

_log = logging.getLogger("hivemind_functions.local")

DEFAULT_JANITOR_INTERVAL_S = 60
DEFAULT_SETTLE_WAIT_S = 2


def loopback_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host`` (which must be a loopback address) and ``port`` (0: any free)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"--host must be a loopback IP address such as 127.0.0.1, not {host!r}") from None
    if not address.is_loopback:
        raise ValueError(f"the local control plane speaks plain HTTP, loopback only, not {host}")
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def write_ready_file(path: Path, host: str, port: int) -> None:
    """Atomically publish where the API listens (0600: it sits in the user's state directory)."""
    temporary = path.with_name(path.name + ".partial")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        json.dump({"host": host, "port": port, "url": _url(host, port), "pid": os.getpid()}, handle)
    os.replace(temporary, path)


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class Workers:
    """The settle poller and the janitor timer, on two daemon threads, stopped by one event."""

    def __init__(self, *, janitor_interval_s: float, settle_wait_s: int) -> None:
        self.stop = threading.Event()
        self._janitor_interval_s = janitor_interval_s
        self._settle_wait_s = settle_wait_s
        self._threads = [
            threading.Thread(target=self._settle_loop, name="settle", daemon=True),
            threading.Thread(target=self._janitor_loop, name="janitor", daemon=True),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def join(self, timeout_s: float) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout_s)

    def _settle_loop(self) -> None:
        settler = settle.Settler.from_env()
        while not self.stop.is_set():
            try:
                settler.serve(self.stop, wait_s=self._settle_wait_s)
            except Exception:
                # A storage hiccup must not end settlement for the rest of the session: log, back off.
                _log.exception("settle worker: polling failed; retrying")
                self.stop.wait(self._settle_wait_s)

    def _janitor_loop(self) -> None:
        while not self.stop.wait(self._janitor_interval_s):
            try:
                report: dict[str, Any] = janitor.handler({"source": "hivemind.local"}, None)
            except Exception:
                _log.exception("janitor: an invocation failed (the next one retries)")
                continue
            _log.debug("janitor: %s", json.dumps(report))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hivemind_functions.local",
        description="Serve the control plane API with its settle worker and janitor on loopback.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to listen on")
    parser.add_argument("--port", type=int, default=8700, help="TCP port (0: any free port)")
    parser.add_argument("--ready-file", type=Path, default=None, help="write {host, port, url} here")
    parser.add_argument(
        "--janitor-interval", type=float, default=DEFAULT_JANITOR_INTERVAL_S, help="seconds between runs"
    )
    parser.add_argument(
        "--settle-wait", type=int, default=DEFAULT_SETTLE_WAIT_S, help="settlements long-poll seconds (1-20)"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.settle_wait <= 20:
        parser.error("--settle-wait must be 1 to 20 seconds")
    if args.janitor_interval < 1:
        parser.error("--janitor-interval must be at least 1 second")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    import uvicorn  # noqa: PLC0415 - only the local stack needs it, not the Lambda handlers

    try:
        FunctionSettings.from_env()  # a malformed setting stops start-up here, not on the first request
        sock = loopback_socket(args.host, args.port)
    except HivemindError as exc:
        print(f"hivemind-local: {exc.message}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"hivemind-local: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    host, port = sock.getsockname()[:2]
    if args.ready_file is not None:
        write_ready_file(args.ready_file, host, port)

    workers = Workers(janitor_interval_s=args.janitor_interval, settle_wait_s=args.settle_wait)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(), log_level="info", access_log=True, lifespan="off", timeout_graceful_shutdown=5
        )
    )

    def request_stop(signum: int, frame: object) -> None:
        del signum, frame
        server.should_exit = True
        workers.stop.set()

    # uvicorn swaps in its own handlers while serving (graceful shutdown), then restores these and
    # re-raises the signal it caught: with these in place, that ends here, so the workers are joined.
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    workers.start()
    _log.info("control plane listening on %s (settle worker and janitor running)", _url(host, port))
    try:
        server.run(sockets=[sock])
    finally:
        workers.join(timeout_s=args.settle_wait + 5)
        sock.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
