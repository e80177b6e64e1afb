"""Control-plane benchmarks (a plain script for ``make bench``, not a pytest test).

1. In-process request latency of ``POST /v1/rooms/{id}/runs`` (the whole admission chain, the ledger
   hold transaction, the envelope upload, the run row and the queue message) and ``GET /v1/runs/{id}``,
   through ``Mangum(app)`` with API Gateway HTTP API v2 events exactly as Lambda calls the handler,
   against a local moto server (``hivemind.store.local.LocalMotoServer``: DynamoDB requests serialised
   as real DynamoDB would order them). Reported: p50, p90, p99 and max over ``--requests`` requests.
2. Cold import time of each Lambda handler module in a fresh interpreter (the import statement only,
   timed inside the child; the interpreter's own start-up is reported separately): min, median and
   max over ``--imports`` fresh processes.

The API handler's cold import must stay under 1 s; the script exits 1 if even its fastest import does
not (the minimum is the figure other processes on a busy machine cannot inflate; the median and the
load average are printed next to it).

    python tests/bench/bench_api.py [--requests 200] [--imports 7]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from mangum import Mangum

from hivemind.encoding import b64encode
from hivemind.envelope import HpkeKeyPair, HpkeSuite, RunEnvelope, seal_run_envelope
from hivemind.keys import auth_hash, auth_token, owner_box_key, owner_sign_key, public_bytes, wrap_key
from hivemind.manifest import (
    AgentRef,
    EgressRule,
    OutputRule,
    QueryRule,
    RoomManifest,
    rules_digest,
    sign_manifest,
)
from hivemind.models import DEFAULT_BUDGET_LIMITS, OutputVisibility, QueryMode, TeeKind, Visibility
from hivemind.store import AwsClients, Store, StoreConfig
from hivemind.store.bootstrap import create_all
from hivemind.store.local import LocalMotoServer
from hivemind.store.rooms import RoomRecord
from hivemind.store.runners import RunnerRecord
from hivemind.tokens import Secret, TokenKind, random_id
from hivemind.trust import RunnerTrust, RunnerTrustMode
from hivemind_functions.api.app import create_app
from hivemind_functions.api.deps import Services
from hivemind_functions.services.tenants import register_tenant
from hivemind_functions.settings import FunctionSettings

HANDLER_MODULES = (
    "hivemind_functions.api.handler",
    "hivemind_functions.settle",
    "hivemind_functions.janitor",
)
API_IMPORT_BUDGET_S = 1.0
RUNNER_FEE = 10


def _percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def _event(method: str, path: str, token: str, body: bytes | None = None, query: str = "") -> dict[str, Any]:
    now = time.time()
    headers = {"host": "api.bench", "authorization": f"Bearer {token}", "content-type": "application/json"}
    if body is not None:
        headers["content-length"] = str(len(body))
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": query,
        "headers": headers,
        "requestContext": {
            "accountId": "123456789012",
            "apiId": "bench",
            "domainName": "api.bench",
            "domainPrefix": "api",
            "http": {
                "method": method,
                "path": path,
                "protocol": "HTTP/1.1",
                "sourceIp": "192.0.2.1",
                "userAgent": "b",
            },
            "requestId": uuid.uuid4().hex,
            "routeKey": "$default",
            "stage": "$default",
            "time": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now)),
            "timeEpoch": int(now * 1000),
        },
        "isBase64Encoded": body is not None,
    }
    if body is not None:
        event["body"] = base64.b64encode(body).decode()
    return event


class _Context:
    function_name = "hivemind-api"
    memory_limit_in_mb = 1024
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:hivemind-api"

    def __init__(self) -> None:
        self.aws_request_id = uuid.uuid4().hex

    @staticmethod
    def get_remaining_time_in_millis() -> int:
        return 30_000


def _timed(call: Callable[[], dict[str, Any]], expected: int) -> float:
    started = time.perf_counter()
    result = call()
    elapsed = time.perf_counter() - started
    if result["statusCode"] != expected:
        raise RuntimeError(f"expected {expected}, got {result['statusCode']}: {result.get('body', '')[:300]}")
    return elapsed


def bench_requests(count: int) -> dict[str, list[float]]:

    for name, value in {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        os.environ.setdefault(name, value)
    server = LocalMotoServer()
    server.start()
    try:
        config = StoreConfig(prefix=f"bench{uuid.uuid4().hex[:10]}", endpoint_url=server.endpoint_url)
        clients = AwsClients(config)
        create_all(clients)
        store = Store(clients)
        settings = FunctionSettings(store=config, run_rate_limit_per_minute=100_000, log_level="WARNING")
        handler = Mangum(create_app(Services.for_store(store, settings)), lifespan="off")

        secret = Secret.generate(TokenKind.TENANT)
        tenant = register_tenant(
            store,
            auth_hash=auth_hash(secret),
            name="bench",
            owner_sign_pub=b64encode(public_bytes(owner_sign_key(secret))),
            owner_box_pub=b64encode(public_bytes(owner_box_key(secret))),
        )
        token = auth_token(secret)
        store.prices.set_runner_fee(RUNNER_FEE, updated_by="bench")
        store.billing.grant(tenant.tenant_id, 10**15)
        compose_hash = "c0" * 32
        runner_keys = HpkeKeyPair.generate()
        runner_id = random_id("runner")
        now = store.clock()
        store.runners.publish(
            RunnerRecord(
                runner_id=runner_id,
                tee=TeeKind.SIMULATED,
                compose_hash=compose_hash,
                version="bench",
                attestation={},
                started_at=now,
                heartbeat_at=now,
            )
        )
        agent = AgentRef(agent_id=random_id("agent"), digest="0" * 64, visibility=Visibility.INSPECTABLE)
        rules = "Only aggregate answers."
        manifest = RoomManifest(
            room_id=random_id("room"),
            tenant_id=tenant.tenant_id,
            name="bench",
            rules=rules,
            rules_sha256=rules_digest(rules),
            policy="",
            scope=agent,
            query=QueryRule(
                mode=QueryMode.FIXED,
                agent_id=agent.agent_id,
                digest=agent.digest,
                visibility=agent.visibility,
            ),
            mediator=None,
            output=OutputRule(visibility=OutputVisibility.QUERIER_ONLY),
            egress=EgressRule(llm_providers=[], artifacts=False),
            budgets=DEFAULT_BUDGET_LIMITS,
            runner_trust=RunnerTrust(
                mode=RunnerTrustMode.OWNER_APPROVED, allowed_compose_hashes=[compose_hash]
            ),
            owner_sign_pub=tenant.owner_sign_pub,
            owner_box_pub=tenant.owner_box_pub,
            created_at=now,
            revision=1,
        )
        signed = sign_manifest(manifest, owner_sign_key(secret))
        store.rooms.create(
            RoomRecord(
                room_id=manifest.room_id,
                tenant_id=tenant.tenant_id,
                envelope=signed.model_dump(mode="json"),
                manifest_hash=signed.manifest_hash,
                revision=1,
                created_at=now,
                updated_at=now,
            )
        )

        def body() -> bytes:
            envelope = RunEnvelope.create(
                room_id=manifest.room_id,
                manifest_hash=signed.manifest_hash,
                bearer_id=tenant.tenant_id,
                wrap_key=wrap_key(secret, manifest.room_id),
                prompt="how many rows are there?",
                reply_pub=public_bytes(X25519PrivateKey.generate()),
                budgets=DEFAULT_BUDGET_LIMITS.defaults,
                now=store.clock(),
            )
            sealed = seal_run_envelope(runner_keys.public_keys(), envelope, suite=HpkeSuite.MLKEM768_X25519)
            return json.dumps(
                {
                    "envelope": sealed.model_dump(mode="json"),
                    "runner_id": runner_id,
                    "prompt_sha256": envelope.prompt_sha256(),
                    "idempotency_key": uuid.uuid4().hex,
                }
            ).encode()

        submit_path = f"/v1/rooms/{manifest.room_id}/runs"
        warmup = 10
        bodies = [body() for _ in range(count + warmup)]
        run_ids: list[str] = []
        submit: list[float] = []
        for index, payload in enumerate(bodies):
            event = _event("POST", submit_path, token, payload)
            result: dict[str, Any] = {}

            def call(event: dict[str, Any] = event, result: dict[str, Any] = result) -> dict[str, Any]:
                result.update(handler(event, _Context()))
                return result

            elapsed = _timed(call, 201)
            run_ids.append(json.loads(result["body"])["run_id"])
            if index >= warmup:
                submit.append(elapsed)
        get_run: list[float] = []
        for index in range(count + warmup):
            event = _event("GET", f"/v1/runs/{run_ids[index % len(run_ids)]}", token)
            elapsed = _timed(lambda event=event: handler(event, _Context()), 200)
            if index >= warmup:
                get_run.append(elapsed)
        return {"POST /v1/rooms/{id}/runs (submit)": submit, "GET /v1/runs/{id}": get_run}
    finally:
        server.stop()


def bench_imports(repeats: int) -> dict[str, tuple[list[float], list[float]]]:
    """Per module: (seconds of the import statement, seconds of the whole fresh process)."""
    probe = (
        "import sys, time; t = time.perf_counter(); import {module}; "
        "sys.stdout.write(repr(time.perf_counter() - t))"
    )
    results: dict[str, tuple[list[float], list[float]]] = {}
    for module in HANDLER_MODULES:
        imports: list[float] = []
        processes: list[float] = []
        for _ in range(repeats):
            started = time.perf_counter()
            output = subprocess.run(
                [sys.executable, "-c", probe.format(module=module)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            processes.append(time.perf_counter() - started)
            imports.append(float(output))
        results[module] = (imports, processes)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="measured requests per route")
    parser.add_argument("--imports", type=int, default=7, help="fresh interpreters per handler module")
    args = parser.parse_args(argv)

    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"load average (1, 5, 15 min) at start: {load}")
    print(f"\nin-process request latency, ms ({args.requests} requests each, Mangum + moto server):")
    print(f"{'route':40} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8}")
    for route, samples in bench_requests(args.requests).items():
        ms = [sample * 1000 for sample in samples]
        print(
            f"{route:40} {_percentile(ms, 0.5):8.1f} {_percentile(ms, 0.9):8.1f} "
            f"{_percentile(ms, 0.99):8.1f} {max(ms):8.1f}"
        )

    print(f"\ncold import of each Lambda handler module, s ({args.imports} fresh interpreters each):")
    print(f"{'module':36} {'min':>7} {'median':>7} {'max':>7}   {'process median':>14}")
    verdict = 0
    for module, (imports, processes) in bench_imports(args.imports).items():
        median = statistics.median(imports)
        print(
            f"{module:36} {min(imports):7.3f} {median:7.3f} {max(imports):7.3f}   "
            f"{statistics.median(processes):14.3f}"
        )
        if module == HANDLER_MODULES[0] and min(imports) >= API_IMPORT_BUDGET_S:
            verdict = 1
    status = "OK" if verdict == 0 else "OVER BUDGET"
    print(f"\nAPI handler cold import budget {API_IMPORT_BUDGET_S:.1f} s: {status}")
    return verdict


if __name__ == "__main__":
    raise SystemExit(main())
