"""Helpers of the security suite: byte-level tampering and a snapshot of a whole deployment.

``deployment_snapshot(store)`` reads every item of every table and every object version of the bucket
of one deployment, so a test can assert that a refused request changed nothing at all, not only the row
it was aimed at. Tables that legitimately move on every request (rate-limit windows, Powertools
idempotency records) are left out.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from hivemind.attestation import AttestationDocument, EventLogEntry, VerifiedQuote, runner_key_binding
from hivemind.envelope import HpkeKeyPair
from hivemind.models import TeeKind
from hivemind.store import Store
from hivemind.store.base import deserialize, serialize
from hivemind.store.schema import SCHEMA, TableRole

# Tables a refused request may touch by design: the per-caller rate-limit counter and Powertools'
# idempotency records (a refusal is counted, never stored as data).
VOLATILE_TABLES = frozenset({TableRole.RATE_LIMITS, TableRole.IDEMPOTENCY})


def flip_byte(data: bytes, position: int | None = None) -> bytes:
    """``data`` with one bit of one byte flipped (the middle byte unless ``position`` is given)."""
    if not data:
        raise ValueError("nothing to flip")
    index = len(data) // 2 if position is None else position % len(data)
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


def truncate(data: bytes, keep: int | None = None) -> bytes:
    """``data`` cut short (to half its length unless ``keep`` says how much to keep)."""
    return data[: len(data) // 2 if keep is None else keep]


def flip_text(text: str, position: int | None = None) -> str:
    """A string with one character changed to another of the same kind (hex stays lowercase hex)."""
    index = len(text) // 2 if position is None else position % len(text)
    char = text[index]
    if char in "0123456789abcdef":
        replacement = "1" if char == "0" else "0"
    elif char.isalpha():
        replacement = "B" if char == "A" else "A"
    else:
        replacement = "0"
    return text[:index] + replacement + text[index + 1 :]


def _table_items(store: Store, role: TableRole) -> list[str]:
    client = store.clients.dynamodb
    name = store.config.table_name(role)
    rows: list[str] = []
    kwargs: dict[str, Any] = {"TableName": name, "ConsistentRead": True}
    while True:
        page = client.scan(**kwargs)
        rows.extend(json.dumps(deserialize(item), sort_keys=True, default=str) for item in page["Items"])
        if "LastEvaluatedKey" not in page:
            return sorted(rows)
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def _bucket_versions(store: Store) -> list[tuple[str, str, str]]:
    s3 = store.clients.s3
    versions: list[tuple[str, str, str]] = []
    kwargs: dict[str, Any] = {"Bucket": store.config.bucket}
    while True:
        page = s3.list_object_versions(**kwargs)
        versions.extend((v["Key"], v["VersionId"], v["ETag"]) for v in page.get("Versions", []))
        versions.extend((m["Key"], m["VersionId"], "delete-marker") for m in page.get("DeleteMarkers", []))
        if not page.get("IsTruncated"):
            return sorted(versions)
        kwargs["KeyMarker"] = page["NextKeyMarker"]
        kwargs["VersionIdMarker"] = page["NextVersionIdMarker"]


def deployment_snapshot(store: Store) -> dict[str, Any]:
    """Every durable item and object version of the deployment (see the module docstring)."""
    snapshot: dict[str, Any] = {
        role.value: _table_items(store, role) for role in TableRole if role not in VOLATILE_TABLES
    }
    snapshot["bucket"] = _bucket_versions(store)
    assert {spec.role for spec in SCHEMA.tables} == set(TableRole), "a table is missing from the snapshot"
    return snapshot


def snapshot_difference(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What changed between two snapshots, per table (empty when nothing did)."""
    changed: dict[str, Any] = {}
    for name, old in before.items():
        added = sorted(set(after[name]) - set(old))
        removed = sorted(set(old) - set(after[name]))
        if added or removed:
            changed[name] = {"added": added, "removed": removed}
    return changed


def edit_row(
    store: Store, role: TableRole, key: dict[str, Any], mutate: Callable[[dict[str, Any]], None]
) -> None:
    """Change one stored item directly, as an attacker with table access would."""
    client = store.clients.dynamodb
    table = store.config.table_name(role)
    row = deserialize(client.get_item(TableName=table, Key=serialize(key), ConsistentRead=True)["Item"])
    mutate(row)
    client.put_item(TableName=table, Item=serialize(row))


def read_row(store: Store, role: TableRole, key: dict[str, Any]) -> dict[str, Any]:
    client = store.clients.dynamodb
    table = store.config.table_name(role)
    return deserialize(client.get_item(TableName=table, Key=serialize(key), ConsistentRead=True)["Item"])


def put_row(store: Store, role: TableRole, row: dict[str, Any]) -> None:
    store.clients.dynamodb.put_item(TableName=store.config.table_name(role), Item=serialize(row))


def delete_row(store: Store, role: TableRole, key: dict[str, Any]) -> None:
    store.clients.dynamodb.delete_item(TableName=store.config.table_name(role), Key=serialize(key))


# --- attestation documents of a (stubbed) genuine TDX runner ---------------------------------------

RUNTIME_EVENT = 0x08000001
APP_ID = "ab" * 20


def runtime_event(name: str, payload: bytes) -> EventLogEntry:
    digest = hashlib.sha384(RUNTIME_EVENT.to_bytes(4, "little") + b":" + name.encode() + b":" + payload)
    return EventLogEntry(
        imr=3, event_type=RUNTIME_EVENT, digest=digest.hexdigest(), event=name, event_payload=payload.hex()
    )


def boot_log(compose_hash: str) -> list[EventLogEntry]:
    return [
        runtime_event("system-preparing", b""),
        runtime_event("app-id", bytes.fromhex(APP_ID)),
        runtime_event("compose-hash", bytes.fromhex(compose_hash)),
        runtime_event("boot-mr-done", b""),
        runtime_event("system-ready", b""),
    ]


def rtmr3_of(events: list[EventLogEntry]) -> bytes:
    register = bytes(48)
    for event in events:
        register = hashlib.sha384(register + bytes.fromhex(event.digest)).digest()
    return register


def tdx_document(keys: HpkeKeyPair, sign_pub: str, compose_hash: str) -> AttestationDocument:
    return AttestationDocument(
        runner_id="runner_tdx1",
        tee=TeeKind.TDX,
        version="0.1.0",
        app_id=APP_ID,
        compose_hash=compose_hash,
        quote="ab" * 64,
        event_log=boot_log(compose_hash),
        hpke_public_keys=keys.public_keys().by_suite(),
        sign_pub=sign_pub,
        published_at=1_700_000_000,
    )


def genuine_quote_for(document: AttestationDocument) -> VerifiedQuote:
    """What DCAP verification of the runner's genuine quote says: it binds the runner's real keys and
    measures its real boot log (stands in for Intel's signature chain, tested in test_attestation)."""
    zero = bytes(48)
    return VerifiedQuote(
        quote_sha256=document.quote_sha256,
        tcb_status="UpToDate",
        advisory_ids=(),
        report_data=runner_key_binding(document.hpke_public_keys, document.sign_pub),
        mr_td=zero,
        mr_config_id=zero,
        mr_owner=zero,
        mr_owner_config=zero,
        mr_seam=zero,
        rtmr0=zero,
        rtmr1=zero,
        rtmr2=zero,
        rtmr3=rtmr3_of(list(document.event_log)),
        td_attributes=bytes(8),
        tee_tcb_svn=bytes(16),
    )


class AnyCollateral:
    def collateral_for(self, quote: bytes, *, now: int) -> dict[str, Any]:
        return {}
