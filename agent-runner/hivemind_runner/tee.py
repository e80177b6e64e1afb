"""TEE providers: where the runner's key seed, quotes and dstack identity come from (DESIGN §6).

Two providers implement :class:`TeeProvider`:

- :class:`DstackTee` (``tdx``, production) talks to the dstack guest agent inside the CVM through
  ``dstack_sdk.DstackClient``: the seed is dstack KMS ``get_key("hivemind/runner/v1")`` (every instance
  of the runner app derives the same one; another app gets another), quotes come from
  ``get_quote(report_data)`` with the event log, and ``info()`` names the app id, compose hash and
  instance id. It is deliberately thin: everything it returns is checked by the client's attestation
  verification, not trusted here.
- :class:`SimulatedTee` (local development and tests) keeps the seed in a 0600 file, produces no quote,
  and reports the compose hash of ``agent-runner/deploy/app-compose.json`` (or an override). Its
  documents say ``tee: "simulated"``; clients refuse them unless told otherwise.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any, Protocol

from dstack_sdk import DstackClient, get_compose_hash
from pydantic import Field, ValidationError

from hivemind.attestation import REPORT_DATA_BYTES, EventLogEntry
from hivemind.envelope import RUNNER_KEY_SEED_BYTES
from hivemind.errors import HivemindError, ServiceUnavailable
from hivemind.models import Sha256Hex, StrictModel, TeeKind

# dstack KMS key path of the runner's seed; changing it changes every key the runner publishes.
RUNNER_KEY_PATH = "hivemind/runner/v1"
SIMULATED_APP_ID = "simulated"
DEFAULT_APP_COMPOSE = Path(__file__).resolve().parent.parent / "deploy" / "app-compose.json"
_HEX = re.compile(r"^(?:[0-9a-f]{2})+$")


class TeeError(HivemindError):
    """The TEE answered something the runner cannot use (malformed key, quote or identity)."""

    code = "tee_error"
    status = 500


class TeeUnavailable(ServiceUnavailable):
    """The TEE cannot be reached (no dstack guest agent socket, seed file unreadable)."""

    code = "tee_unavailable"


class TeeIdentity(StrictModel):
    """What the TEE says this runner is: dstack app, compose hash (what rooms pin), instance."""

    app_id: str = Field(min_length=1, max_length=128)
    compose_hash: Sha256Hex
    instance_id: str | None = Field(default=None, min_length=1, max_length=128)


class TeeProvider(Protocol):
    """Key seed, quotes and identity of the environment the runner runs in."""

    @property
    def kind(self) -> TeeKind: ...

    def seed(self) -> bytes:
        """The 32-byte seed every runner key derives from."""

    def quote(self, report_data: bytes) -> tuple[bytes, list[EventLogEntry]]:
        """A quote over exactly ``report_data`` (64 bytes) and the event log that goes with it."""

    def identity(self) -> TeeIdentity: ...


def _check_report_data(report_data: bytes) -> None:
    if not isinstance(report_data, bytes) or len(report_data) != REPORT_DATA_BYTES:
        raise TeeError(f"report_data is exactly {REPORT_DATA_BYTES} bytes")


# --- dstack (Intel TDX) ----------------------------------------------------------------------------


def _lower_hex(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _HEX.fullmatch(value.lower()):
        raise TeeError(f"the dstack guest agent reported a {what} that is not hex")
    return value.lower()


class DstackTee:
    """The dstack guest agent of a TDX CVM. Raises :class:`TeeUnavailable` when it cannot be reached."""

    kind = TeeKind.TDX

    def __init__(self, client: Any | None = None, *, endpoint: str | None = None) -> None:
        if client is None:
            try:
                client = DstackClient(endpoint)
            except FileNotFoundError:
                shown = endpoint or "/var/run/dstack.sock (or /run/dstack.sock, /run/dstack/dstack.sock)"
                raise TeeUnavailable(
                    f"no dstack guest agent socket at {shown}: the tdx TEE works only inside a dstack CVM; "
                    "use HIVEMIND_TEE=simulated for local development"
                ) from None
        self._client = client

    def _call(self, method: str, *args: Any) -> Any:
        try:
            return getattr(self._client, method)(*args)
        except OSError as exc:
            raise TeeUnavailable(
                f"the dstack guest agent did not answer {method}: {type(exc).__name__}"
            ) from None
        except Exception as exc:
            # httpx and dstack_sdk raise their own types (HTTP status, protocol, validation errors).
            raise TeeUnavailable(f"the dstack guest agent refused {method}: {type(exc).__name__}") from None

    def seed(self) -> bytes:
        response = self._call("get_key", RUNNER_KEY_PATH)
        try:
            key = response.decode_key()
        except (AttributeError, ValueError):
            raise TeeError("dstack KMS returned a key that is not hex") from None
        if len(key) != RUNNER_KEY_SEED_BYTES:
            raise TeeError(f"dstack KMS returned a {len(key)}-byte key; the runner seed is 32 bytes")
        return key

    def quote(self, report_data: bytes) -> tuple[bytes, list[EventLogEntry]]:
        _check_report_data(report_data)
        response = self._call("get_quote", report_data)
        try:
            quote = response.decode_quote()
            raw_events = json.loads(response.event_log)
        except (AttributeError, ValueError, TypeError):
            raise TeeError("dstack returned a quote or event log that does not parse") from None
        if not quote:
            raise TeeError("dstack returned an empty quote")
        if not isinstance(raw_events, list):
            raise TeeError("dstack returned an event log that is not a list")
        try:
            # Strict: an event in a format we do not know (e.g. dstack's v2 digests) fails closed here
            # rather than producing a document every client would refuse.
            events = [EventLogEntry.model_validate(event) for event in raw_events]
        except ValidationError as exc:
            raise TeeError(
                f"dstack returned an event log entry this runner cannot publish: {exc.errors()[0]['msg']}"
            ) from None
        return quote, events

    def identity(self) -> TeeIdentity:
        info = self._call("info")
        try:
            app_id, compose_hash, instance_id = info.app_id, info.compose_hash, info.instance_id
        except AttributeError:
            raise TeeError("dstack info lacks app_id, compose_hash or instance_id") from None
        try:
            return TeeIdentity(
                app_id=_lower_hex(app_id, "app id"),
                compose_hash=_lower_hex(compose_hash, "compose hash"),
                instance_id=_lower_hex(instance_id, "instance id") if instance_id else None,
            )
        except ValidationError:
            raise TeeError("dstack info reported a compose hash that is not a SHA-256") from None


# --- simulated -------------------------------------------------------------------------------------


def compose_hash_of(app_compose: Path) -> str:
    """The dstack compose hash of an app-compose file, as dstack computes it (``get_compose_hash``)."""
    try:
        content = json.loads(app_compose.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TeeUnavailable(f"cannot read the app compose file {app_compose}: {exc}") from None
    if not isinstance(content, dict) or "runner" not in content:
        raise TeeError(f"{app_compose} is not a dstack app-compose document")
    return get_compose_hash(content)


def read_or_create_seed(path: Path) -> bytes:
    """The 32-byte seed in ``path``, created (mode 0600, parent 0700) with fresh random bytes if missing.

    An existing seed that others can read or write is refused: whoever reads it can open every run
    envelope sealed to this runner.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        pass
    except OSError as exc:
        raise TeeUnavailable(f"cannot create the runner seed file {path}: {exc.strerror}") from None
    else:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(os.urandom(RUNNER_KEY_SEED_BYTES))
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise TeeUnavailable(f"cannot read the runner seed file {path}: {exc.strerror}") from None
    with os.fdopen(descriptor, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise TeeError(f"the runner seed {path} is not a regular file")
        if info.st_mode & 0o077:
            raise TeeError(
                f"the runner seed {path} is accessible to other users (mode {stat.S_IMODE(info.st_mode):o}); "
                "chmod 600 it"
            )
        seed = handle.read(RUNNER_KEY_SEED_BYTES + 1)
    if len(seed) != RUNNER_KEY_SEED_BYTES:
        raise TeeError(f"the runner seed {path} holds {len(seed)} bytes, not {RUNNER_KEY_SEED_BYTES}")
    return seed


class SimulatedTee:
    """No TEE at all: a local seed file and no quote. For development and tests only."""

    kind = TeeKind.SIMULATED

    def __init__(
        self,
        seed_file: Path,
        *,
        compose_hash: str | None = None,
        app_compose: Path = DEFAULT_APP_COMPOSE,
        app_id: str = SIMULATED_APP_ID,
    ) -> None:
        self._seed_file = seed_file
        resolved = compose_hash if compose_hash is not None else compose_hash_of(app_compose)
        try:
            self._identity = TeeIdentity(app_id=app_id, compose_hash=resolved, instance_id=None)
        except ValidationError:
            raise TeeError("the simulated compose hash must be 64 lowercase hex characters") from None

    def seed(self) -> bytes:
        return read_or_create_seed(self._seed_file)

    def quote(self, report_data: bytes) -> tuple[bytes, list[EventLogEntry]]:
        _check_report_data(report_data)
        # A simulated document carries no quote and no event log; it proves nothing about the host.
        return b"", []

    def identity(self) -> TeeIdentity:
        return self._identity
