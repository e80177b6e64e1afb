"""The runner's attestation document: built once at start, published, and kept alive by a heartbeat.

The quote is taken over ``runner_key_binding(hpke_public_keys, sign_pub)`` (DESIGN §6, §16.2), so a
client that verifies the document knows the envelope and receipt keys are the ones inside this TEE.
The keys are long-lived (derived from the KMS seed), so one quote serves the runner's whole life; the
heartbeat only refreshes ``heartbeat_at`` and re-publishes the document if its row disappeared.
"""

from __future__ import annotations

import contextlib
import threading

from hivemind.attestation import AttestationDocument
from hivemind.errors import HivemindError, NotFound
from hivemind.store import Store
from hivemind.store.runners import RunnerRecord, RunnerStatus
from hivemind.trust import SignedRelease
from hivemind_runner.keys import RunnerKeys
from hivemind_runner.tee import TeeProvider
from hivemind_runner.telemetry import StructuredLogger


def build_attestation(
    *,
    runner_id: str,
    tee: TeeProvider,
    keys: RunnerKeys,
    version: str,
    now: int,
    release: SignedRelease | None = None,
) -> AttestationDocument:
    """Ask the TEE for a quote binding ``keys`` and assemble the document clients verify."""
    quote, event_log = tee.quote(keys.report_data())
    identity = tee.identity()
    return AttestationDocument(
        runner_id=runner_id,
        tee=tee.kind,
        version=version,
        app_id=identity.app_id,
        compose_hash=identity.compose_hash,
        instance_id=identity.instance_id,
        quote=quote.hex(),
        event_log=event_log,
        hpke_public_keys=keys.hpke_public_keys.by_suite(),
        sign_pub=keys.sign_pub,
        published_at=now,
        release=release,
    )


class AttestationPublisher:
    """Publishes one runner's document to the Runners table and heartbeats it from a daemon thread."""

    def __init__(
        self, store: Store, document: AttestationDocument, *, interval_s: float, logger: StructuredLogger
    ) -> None:
        if interval_s <= 0:
            raise ValueError("the heartbeat interval must be positive")
        self._store = store
        self._document = document
        self._interval_s = interval_s
        self._logger = logger
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Serialises the final status against a late drain(): "stopped" is always the last word.
        self._status_lock = threading.Lock()
        self._stopped = False

    @property
    def document(self) -> AttestationDocument:
        return self._document

    def publish(self) -> RunnerRecord:
        now = self._store.clock()
        record = RunnerRecord(
            runner_id=self._document.runner_id,
            tee=self._document.tee,
            compose_hash=self._document.compose_hash,
            version=self._document.version,
            attestation=self._document.model_dump(mode="json"),
            status=RunnerStatus.ACTIVE,
            started_at=now,
            heartbeat_at=now,
        )
        return self._store.runners.publish(record)

    def beat(self) -> None:
        """One heartbeat; a runner row that vanished (table restored, janitor) is published again."""
        try:
            self._store.runners.heartbeat(self._document.runner_id)
        except NotFound:
            self.publish()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the heartbeat is already running")
        self._thread = threading.Thread(target=self._loop, name="attestation-heartbeat", daemon=True)
        self._thread.start()

    def stop(self, status: RunnerStatus = RunnerStatus.STOPPED) -> None:
        """Stop heartbeating and mark the runner ``status`` so clients stop choosing it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._status_lock, contextlib.suppress(HivemindError):
            self._stopped = True
            self._store.runners.set_status(self._document.runner_id, status)

    def drain(self) -> None:
        """Tell clients to stop sealing new runs to this runner while in-flight runs finish."""
        with self._status_lock, contextlib.suppress(HivemindError):
            if not self._stopped:
                self._store.runners.set_status(self._document.runner_id, RunnerStatus.DRAINING)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.beat()
            except HivemindError as exc:
                # A missed heartbeat only ages the row; the next one may succeed.
                self._logger.event("heartbeat_failed", error_code=exc.code)
