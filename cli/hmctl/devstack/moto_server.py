"""``python -m hmctl.devstack.moto_server``: the local stack's moto server (S3, DynamoDB, SQS) in its own
process.

It is :class:`hivemind.store.local.LocalMotoServer` (DynamoDB requests serialised like real DynamoDB) on
a loopback address. With ``--ready-file`` the bound endpoint is written there as JSON once it listens, so
the supervisor can ask for port 0 without racing for a port. It runs until SIGTERM or SIGINT; all data
lives in memory and goes with the process.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import sys
import threading
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hmctl.devstack.moto_server")
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to listen on")
    parser.add_argument("--port", type=int, default=0, help="TCP port (0: any free port)")
    parser.add_argument("--ready-file", type=Path, default=None, help="write {endpoint_url, pid} here")
    args = parser.parse_args(argv)
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        # The emulator has no authentication at all: it must never be reachable from the network.
        print(f"moto_server: --host must be a loopback address, not {args.host!r}", file=sys.stderr)
        return 2

    from hivemind.store.local import LocalMotoServer  # noqa: PLC0415 - imports moto (heavy)

    server = LocalMotoServer(args.host, args.port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    failures: list[BaseException] = []

    def on_thread_error(hook: threading.ExceptHookArgs) -> None:
        # The server binds in its own thread; a failed bind would otherwise leave start() waiting forever.
        failures.append(hook.exc_value or RuntimeError("moto server thread failed"))
        stop.set()

    threading.excepthook = on_thread_error
    starter = threading.Thread(target=server.start, name="moto-start", daemon=True)
    starter.start()
    while starter.is_alive() and not stop.is_set():
        starter.join(0.1)
    if failures:
        # werkzeug reports a taken port by printing it and raising SystemExit in the server thread.
        reason = "the port is in use" if isinstance(failures[0], SystemExit) else str(failures[0])
        print(f"moto_server: cannot listen on {args.host}:{args.port}: {reason}", file=sys.stderr)
        return 2
    if stop.is_set():
        return 0
    endpoint = server.endpoint_url
    if args.ready_file is not None:
        partial = args.ready_file.with_name(args.ready_file.name + ".partial")
        descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            json.dump({"endpoint_url": endpoint, "pid": os.getpid()}, handle)
        os.replace(partial, args.ready_file)
    print(f"moto server listening on {endpoint}", flush=True)
    stop.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
