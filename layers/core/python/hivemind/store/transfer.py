"""Export a whole deployment to one archive file and import it into another; nothing is ever decrypted.

An export holds every item of every table of :data:`~hivemind.store.schema.SCHEMA` and every object of
the bucket exactly as stored: HMS1 ciphertext, signed envelopes, wraps, ledger entries. The engine holds
no key and opens nothing, so an archive is as confidential as the deployment's metadata (who, when, how
much) and no more; store it like a database backup.

Archive (an uncompressed tar; members in this order)::

    tables/<role>.jsonl   one DynamoDB item per line, in the wire format ({"S": ...}, {"N": ...}),
                          binary values base64; exact round trip of types
    blobs/<n>             one object version, byte for byte
    objects.jsonl         one line per blob: key, source version id, size, SHA-256, content type
    manifest.json         format, source, schema digest, per table: item count and SHA-256 of its
                          member; for the objects index: count, bytes and SHA-256

Which object versions: the current version of every key, plus every older version a record pins
(room items and agent sources record the exact version they verified). Delete markers are not
exported: a key whose current version is deleted is exported only through the versions records pin.

Import (:func:`import_archive`) verifies the whole archive first (every member's size and SHA-256
against the manifest, the schema digest against this code's schema) and writes nothing if anything is
off. Then objects, then tables (accounts last, after the ledger entries their heads point at).

Conflict rule (re-importing the same archive is a no-op, never a duplicate):

- **items**: absent in the target: written. Present and identical: unchanged. Present and different:
  replaced only if the archive's copy is strictly newer by the table's freshness attribute
  (``last_seq`` for accounts, ``heartbeat_at`` for runners, ``updated_at`` where an item has it);
  otherwise the target's item is kept. The comparison and the write are one conditional put, so a
  target that moves on concurrently is never overwritten by an older archive item. Items without a
  freshness attribute (ledger entries, wraps, credentials, nonces, markers) are write-once: a
  different item already there is a **conflict**.
- **objects**: a key absent in the target gets its archived versions, oldest first, so the current
  one stays current. A key whose existing versions are all archive content gets the missing ones. A
  key holding anything else is kept and is a conflict, and records pinning it are not imported
  (conflicts too). Imported objects carry their SHA-256 as metadata (``hivemind-sha256``) so a
  re-import recognises them without reading them.

Object versions get new ids in the target; records that pin a version are rewritten to the new id
(room items' ``version_id``, agents' ``source_object.version_id``). Nothing signed contains a version
id, so every envelope, receipt and ledger hash still verifies: :func:`verify_deployment` checks that.

Export from a quiet deployment (no traffic): scans are not a point-in-time snapshot, and a ledger
entry appended between the ledger and accounts scans would leave a chain that does not verify.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import Field, ValidationError

from hivemind.canonical import canonical_sha256
from hivemind.errors import IntegrityError, InvalidInput, StoreError
from hivemind.manifest import SignedManifest, verify_manifest
from hivemind.models import Sha256Hex, StrictModel, UnixSeconds
from hivemind.store import Store
from hivemind.store.base import Clock, deserialize, raise_store_error, system_clock
from hivemind.store.config import AwsClients
from hivemind.store.schema import SCHEMA, TableRole, TableSpec

FORMAT = "hivemind-export/1"
MANIFEST_MEMBER = "manifest.json"
OBJECTS_MEMBER = "objects.jsonl"
SHA256_METADATA = "hivemind-sha256"
_TABLE_MEMBER = re.compile(r"^tables/[a-z-]+\.jsonl$")
_BLOB_MEMBER = re.compile(r"^blobs/\d{9}$")
_CHUNK = 1024 * 1024
_PART = 64 * 1024 * 1024
# Accounts last: an account head must never point past ledger entries that are not there yet.
_IMPORT_ORDER = (
    *(spec for spec in SCHEMA.tables if spec.role is not TableRole.ACCOUNTS),
    SCHEMA.table(TableRole.ACCOUNTS),
)
_FRESHNESS = {TableRole.ACCOUNTS: "last_seq", TableRole.RUNNERS: "heartbeat_at"}


# --- wire models -----------------------------------------------------------------------------------


class TableEntry(StrictModel):
    role: TableRole
    member: str = Field(pattern=_TABLE_MEMBER.pattern)
    items: int = Field(ge=0)
    sha256: Sha256Hex


class ObjectsIndex(StrictModel):
    member: Literal["objects.jsonl"] = OBJECTS_MEMBER
    count: int = Field(ge=0)
    bytes: int = Field(ge=0)
    sha256: Sha256Hex


class ExportSource(StrictModel):
    prefix: str
    region: str
    bucket: str


class ExportManifest(StrictModel):
    format: Literal["hivemind-export/1"] = FORMAT
    created_at: UnixSeconds
    source: ExportSource
    schema_digest: Sha256Hex
    tables: list[TableEntry]
    objects: ObjectsIndex


class ObjectEntry(StrictModel):
    """One exported object version (a line of objects.jsonl)."""

    member: str = Field(pattern=_BLOB_MEMBER.pattern)
    key: str = Field(min_length=1, max_length=1024)
    source_version_id: str | None
    size: int = Field(ge=0)
    sha256: Sha256Hex
    content_type: str = Field(min_length=1, max_length=255)


class TableCounts(StrictModel):
    written: int = 0
    unchanged: int = 0
    kept_newer: int = 0
    conflicts: int = 0


class ImportConflict(StrictModel):
    """Something the import did not write because the target holds other data there."""

    where: str  # "object" or the table role
    key: str
    reason: str


class ImportReport(StrictModel):
    archive: ExportManifest
    tables: dict[str, TableCounts]
    objects_written: int = 0
    objects_unchanged: int = 0
    conflicts: list[ImportConflict] = Field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.conflicts


@dataclass
class _Tally:
    """Counts while importing (the reports are immutable)."""

    tables: dict[str, dict[str, int]] = field(default_factory=dict)
    objects_written: int = 0
    objects_unchanged: int = 0
    conflicts: list[ImportConflict] = field(default_factory=list)

    def table(self, role: TableRole) -> dict[str, int]:
        return self.tables.setdefault(role.value, dict.fromkeys(TableCounts.model_fields, 0))

    def conflict(self, where: str, key: str, reason: str) -> None:
        self.conflicts.append(ImportConflict(where=where, key=key, reason=reason))

    def report(self, archive: ExportManifest) -> ImportReport:
        return ImportReport(
            archive=archive,
            tables={role: TableCounts(**counts) for role, counts in self.tables.items()},
            objects_written=self.objects_written,
            objects_unchanged=self.objects_unchanged,
            conflicts=list(self.conflicts),
        )


class VerificationReport(StrictModel):
    rooms: int
    audit_events: int
    ledger_entries: int
    items: int
    agents: int


def schema_digest() -> str:
    """SHA-256 of the table keys and indexes: an archive imports only into the schema it came from."""
    return canonical_sha256(
        [
            {
                "role": spec.role.value,
                "keys": [_attr(spec.partition_key), _attr(spec.sort_key)],
                "indexes": [
                    {"name": index.name, "keys": [_attr(index.partition_key), _attr(index.sort_key)]}
                    for index in spec.indexes
                ],
            }
            for spec in SCHEMA.tables
        ]
    )


def _attr(attr: Any) -> list[str] | None:
    return None if attr is None else [attr.name, attr.type.value]


# --- export ----------------------------------------------------------------------------------------


class _HashingReader(io.RawIOBase):
    """Reads exactly what is asked (tarfile treats a short read as the end) from a stream of chunks,
    hashing as it goes; refuses to yield more than ``size`` bytes."""

    def __init__(self, chunks: Iterator[bytes], size: int) -> None:
        self._chunks = chunks
        self._size = size
        self._chunk = b""
        self._offset = 0
        self.count = 0
        self.hasher = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        parts: list[bytes] = []
        wanted = size
        while wanted != 0:
            if self._offset >= len(self._chunk):
                chunk = next(self._chunks, None)
                if chunk is None:
                    break
                self._chunk, self._offset = chunk, 0
            end = len(self._chunk) if wanted < 0 else min(len(self._chunk), self._offset + wanted)
            parts.append(self._chunk[self._offset : end])
            if wanted > 0:
                wanted -= end - self._offset
            self._offset = end
        data = b"".join(parts)
        self.count += len(data)
        if self.count > self._size:
            raise IntegrityError("an object grew while it was exported", code="export_object_changed")
        self.hasher.update(data)
        return data


def _add_file(archive: tarfile.TarFile, name: str, handle: IO[bytes], size: int, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime
    info.mode = 0o600
    archive.addfile(info, handle)


def _encode_value(value: dict[str, Any]) -> dict[str, Any]:
    ((kind, inner),) = value.items()
    if kind == "B":
        return {"B": base64.b64encode(inner).decode("ascii")}
    if kind == "BS":
        return {"BS": sorted(base64.b64encode(item).decode("ascii") for item in inner)}
    if kind in ("SS", "NS"):
        return {kind: sorted(inner)}
    if kind == "M":
        return {"M": {name: _encode_value(item) for name, item in inner.items()}}
    if kind == "L":
        return {"L": [_encode_value(item) for item in inner]}
    return {kind: inner}


def _decode_value(value: dict[str, Any]) -> dict[str, Any]:
    ((kind, inner),) = value.items()
    if kind == "B":
        return {"B": base64.b64decode(inner, validate=True)}
    if kind == "BS":
        return {"BS": [base64.b64decode(item, validate=True) for item in inner]}
    if kind == "M":
        return {"M": {name: _decode_value(item) for name, item in inner.items()}}
    if kind == "L":
        return {"L": [_decode_value(item) for item in inner]}
    return {kind: inner}


def _encode_item(item: dict[str, Any]) -> dict[str, Any]:
    return {name: _encode_value(value) for name, value in item.items()}


def _decode_item(item: dict[str, Any]) -> dict[str, Any]:
    return {name: _decode_value(value) for name, value in item.items()}


def _pins(role: TableRole, item: dict[str, Any]) -> list[tuple[str, str, list[str]]]:
    """Object versions an exported item pins: (key, version id, path of the version attribute)."""
    if role is TableRole.ROOMS and "version_id" in item and "s3_key" in item:
        return [(item["s3_key"]["S"], item["version_id"]["S"], ["version_id"])]
    if role is TableRole.AGENTS and "source_object" in item:
        source = item["source_object"]["M"]
        if "version_id" in source and "key" in source:
            return [(source["key"]["S"], source["version_id"]["S"], ["source_object", "version_id"])]
    return []


def _scan(clients: AwsClients, spec: TableSpec) -> Iterator[dict[str, Any]]:
    paginator = clients.dynamodb.get_paginator("scan")
    try:
        for page in paginator.paginate(TableName=clients.config.table_name(spec.role), ConsistentRead=True):
            yield from page.get("Items", [])
    except (ClientError, BotoCoreError) as exc:
        raise_store_error(exc, f"export {spec.role}")


def _version(version_id: str | None) -> str | None:
    # S3 reports objects written before versioning was enabled with the version id "null".
    return None if version_id in (None, "null") else version_id


def export_deployment(clients: AwsClients, out: Path, *, clock: Clock = system_clock) -> ExportManifest:
    """Write the deployment of ``clients`` to the archive ``out`` (which must not exist yet)."""
    if out.exists():
        raise InvalidInput(f"{out} already exists; an export never overwrites a file")
    created_at = clock()
    partial = out.with_name(out.name + ".partial")
    pinned: set[tuple[str, str]] = set()
    tables: list[TableEntry] = []
    try:
        with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as archive:
            for spec in SCHEMA.tables:
                tables.append(_export_table(clients, spec, archive, created_at, pinned))
            objects = _export_objects(clients, archive, created_at, pinned)
            manifest = ExportManifest(
                created_at=created_at,
                source=ExportSource(
                    prefix=clients.config.prefix, region=clients.config.region, bucket=clients.config.bucket
                ),
                schema_digest=schema_digest(),
                tables=tables,
                objects=objects,
            )
            body = manifest.model_dump_json().encode("utf-8")
            _add_file(archive, MANIFEST_MEMBER, io.BytesIO(body), len(body), created_at)
        os.replace(partial, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        raise
    return manifest


def _export_table(
    clients: AwsClients, spec: TableSpec, archive: tarfile.TarFile, mtime: int, pinned: set[tuple[str, str]]
) -> TableEntry:
    hasher = hashlib.sha256()
    count = 0
    with tempfile.TemporaryFile() as spool:
        for item in _scan(clients, spec):
            line = json.dumps(_encode_item(item), sort_keys=True, separators=(",", ":")).encode() + b"\n"
            spool.write(line)
            hasher.update(line)
            count += 1
            pinned.update((key, version) for key, version, _ in _pins(spec.role, item))
        size = spool.tell()
        spool.seek(0)
        member = f"tables/{spec.role.value}.jsonl"
        _add_file(archive, member, spool, size, mtime)
    return TableEntry(role=spec.role, member=member, items=count, sha256=hasher.hexdigest())


def _object_versions(clients: AwsClients, pinned: set[tuple[str, str]]) -> Iterator[dict[str, Any]]:
    """Per key, oldest first: the pinned older versions, then the current one."""
    paginator = clients.s3.get_paginator("list_object_versions")
    by_key: dict[str, list[dict[str, Any]]] = {}
    try:
        for page in paginator.paginate(Bucket=clients.config.bucket):
            for version in page.get("Versions", []):
                by_key.setdefault(version["Key"], []).append(version)
    except (ClientError, BotoCoreError) as exc:
        raise_store_error(exc, "export objects")
    for key in sorted(by_key):
        wanted = [
            version for version in by_key[key] if version["IsLatest"] or (key, version["VersionId"]) in pinned
        ]
        yield from sorted(wanted, key=lambda version: (version["IsLatest"], version["LastModified"]))


def _export_objects(
    clients: AwsClients, archive: tarfile.TarFile, mtime: int, pinned: set[tuple[str, str]]
) -> ObjectsIndex:
    s3 = clients.s3
    total = 0
    with tempfile.TemporaryFile() as index:
        count = 0
        for version in _object_versions(clients, pinned):
            count += 1
            member = f"blobs/{count:09d}"
            params: dict[str, Any] = {"Bucket": clients.config.bucket, "Key": version["Key"]}
            if _version(version["VersionId"]) is not None:
                params["VersionId"] = version["VersionId"]
            try:
                response = s3.get_object(**params)
            except (ClientError, BotoCoreError) as exc:
                raise_store_error(exc, f"export {version['Key']}")
            body = response["Body"]
            try:
                reader = _HashingReader(body.iter_chunks(_CHUNK), version["Size"])
                _add_file(archive, member, reader, version["Size"], mtime)  # type: ignore[arg-type]
            finally:
                body.close()
            entry = ObjectEntry(
                member=member,
                key=version["Key"],
                source_version_id=_version(version["VersionId"]),
                size=version["Size"],
                sha256=reader.hasher.hexdigest(),
                content_type=response.get("ContentType") or "application/octet-stream",
            )
            index.write(entry.model_dump_json().encode() + b"\n")
            total += version["Size"]
        size = index.tell()
        index.seek(0)
        digest = _hash_stream(index)
        index.seek(0)
        _add_file(archive, OBJECTS_MEMBER, index, size, mtime)
    return ObjectsIndex(count=count, bytes=total, sha256=digest)


def _hash_stream(handle: IO[bytes]) -> str:
    hasher = hashlib.sha256()
    while chunk := handle.read(_CHUNK):
        hasher.update(chunk)
    return hasher.hexdigest()


# --- reading an archive ----------------------------------------------------------------------------


class _Archive:
    """A verified archive: every member checked against the manifest before anything is used."""

    def __init__(self, path: Path) -> None:
        try:
            self._tar = tarfile.open(path, "r:")
        except (OSError, tarfile.TarError) as exc:
            raise IntegrityError(f"{path} is not an export archive: {exc}", code="archive_invalid") from None
        members = self._tar.getmembers()
        self._members = {member.name: member for member in members}
        if len(self._members) != len(members):
            raise _corrupt("a member name appears twice")
        for name, member in self._members.items():
            known = (
                name in (MANIFEST_MEMBER, OBJECTS_MEMBER)
                or _TABLE_MEMBER.fullmatch(name) is not None
                or _BLOB_MEMBER.fullmatch(name) is not None
            )
            if not known:
                raise _corrupt(f"unexpected member {name!r}")
            if not member.isfile():
                raise _corrupt(f"member {name!r} is not a regular file")
        self.manifest = self._read_manifest()
        self.objects: list[ObjectEntry] = []
        self._verify()

    def close(self) -> None:
        self._tar.close()

    def open_member(self, name: str) -> IO[bytes]:
        member = self._members.get(name)
        handle = self._tar.extractfile(member) if member is not None else None
        if handle is None:
            raise _corrupt(f"member {name!r} is missing")
        return handle

    def lines(self, name: str) -> Iterator[dict[str, Any]]:
        with self.open_member(name) as handle:
            for line in handle:
                try:
                    yield json.loads(line)
                except ValueError:
                    raise _corrupt(f"{name} holds a line that is not JSON") from None

    def _read_manifest(self) -> ExportManifest:
        with self.open_member(MANIFEST_MEMBER) as handle:
            raw = handle.read(1024 * 1024 + 1)
        try:
            manifest = ExportManifest.model_validate_json(raw)
        except ValidationError as exc:
            raise _corrupt(f"manifest.json is invalid: {exc.errors()[0]['msg']}") from None
        if manifest.schema_digest != schema_digest():
            raise IntegrityError(
                "the archive was made with another table schema; import it with the version that made it",
                code="archive_schema_mismatch",
            )
        roles = [entry.role for entry in manifest.tables]
        if sorted(roles) != sorted(spec.role for spec in SCHEMA.tables):
            raise _corrupt("the manifest does not list every table exactly once")
        for entry in manifest.tables:
            if entry.member != f"tables/{entry.role.value}.jsonl":
                raise _corrupt(f"table {entry.role} is stored under an unexpected name")
        return manifest

    def _verify(self) -> None:
        for entry in self.manifest.tables:
            digest, lines = self._digest(entry.member, count_lines=True)
            if digest != entry.sha256 or lines != entry.items:
                raise _corrupt(f"{entry.member} does not match the manifest")
        index = self.manifest.objects
        digest, lines = self._digest(OBJECTS_MEMBER, count_lines=True)
        if digest != index.sha256 or lines != index.count:
            raise _corrupt("objects.jsonl does not match the manifest")
        members: set[str] = set()
        total = 0
        for line in self.lines(OBJECTS_MEMBER):
            try:
                entry = ObjectEntry.model_validate(line)
            except ValidationError:
                raise _corrupt("objects.jsonl holds an invalid entry") from None
            if entry.member in members:
                raise _corrupt(f"{entry.member} is listed twice")
            members.add(entry.member)
            member = self._members.get(entry.member)
            if member is None or member.size != entry.size:
                raise _corrupt(f"{entry.member} ({entry.key}) is missing or has another size")
            if self._digest(entry.member)[0] != entry.sha256:
                raise _corrupt(f"{entry.member} ({entry.key}) does not match its SHA-256")
            total += entry.size
            self.objects.append(entry)
        if total != index.bytes:
            raise _corrupt("the objects do not add up to the manifest's byte count")
        stray = {name for name in self._members if _BLOB_MEMBER.fullmatch(name)} - members
        if stray:
            raise _corrupt(f"{len(stray)} blobs are not in the objects index")

    def _digest(self, name: str, *, count_lines: bool = False) -> tuple[str, int]:
        hasher = hashlib.sha256()
        lines = 0
        with self.open_member(name) as handle:
            while chunk := handle.read(_CHUNK):
                hasher.update(chunk)
                if count_lines:
                    lines += chunk.count(b"\n")
        return hasher.hexdigest(), lines


def _corrupt(message: str) -> IntegrityError:
    return IntegrityError(f"archive is corrupt: {message}", code="archive_corrupt")


def read_manifest(path: Path) -> ExportManifest:
    """Verify the archive at ``path`` completely and return its manifest (nothing is written)."""
    archive = _Archive(path)
    try:
        return archive.manifest
    finally:
        archive.close()


# --- import ----------------------------------------------------------------------------------------


def import_archive(clients: AwsClients, path: Path) -> ImportReport:
    """Import the archive at ``path`` into the (existing) deployment of ``clients``; see the module doc."""
    archive = _Archive(path)
    try:
        tally = _Tally()
        versions, conflicted_keys = _import_objects(clients, archive, tally)
        entries = {entry.role: entry for entry in archive.manifest.tables}
        for spec in _IMPORT_ORDER:
            _import_table(
                clients,
                spec,
                lines=archive.lines(entries[spec.role].member),
                versions=versions,
                conflicted_keys=conflicted_keys,
                tally=tally,
            )
        return tally.report(archive.manifest)
    finally:
        archive.close()


def _existing_versions(clients: AwsClients, key: str) -> list[tuple[str | None, str]]:
    """(version id, SHA-256) of every stored version of exactly ``key``."""
    s3 = clients.s3
    bucket = clients.config.bucket
    found: list[tuple[str | None, str]] = []
    try:
        for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=key):
            for version in page.get("Versions", []):
                if version["Key"] != key:
                    continue
                params: dict[str, Any] = {"Bucket": bucket, "Key": key}
                if _version(version["VersionId"]) is not None:
                    params["VersionId"] = version["VersionId"]
                digest = s3.head_object(**params).get("Metadata", {}).get(SHA256_METADATA)
                if digest is None:
                    # Not written by an import: hash it (objects from uploads carry no such metadata).
                    body = s3.get_object(**params)["Body"]
                    try:
                        hasher = hashlib.sha256()
                        for chunk in body.iter_chunks(_CHUNK):
                            hasher.update(chunk)
                    finally:
                        body.close()
                    digest = hasher.hexdigest()
                found.append((_version(version["VersionId"]), digest))
    except (ClientError, BotoCoreError) as exc:
        raise_store_error(exc, f"inspect {key}")
    return found


def _import_objects(
    clients: AwsClients, archive: _Archive, tally: _Tally
) -> tuple[dict[tuple[str, str], str | None], set[str]]:
    """Put the archive's objects; returns (source key, version) -> target version, and conflicted keys."""
    by_key: dict[str, list[ObjectEntry]] = {}
    for entry in archive.objects:
        by_key.setdefault(entry.key, []).append(entry)
    mapping: dict[tuple[str, str], str | None] = {}
    conflicted: set[str] = set()
    for key, entries in by_key.items():
        existing = _existing_versions(clients, key)
        archived = {entry.sha256 for entry in entries}
        if any(digest not in archived for _, digest in existing):
            conflicted.add(key)
            tally.conflict("object", key, "the target holds other content under this key")
            continue
        target = {digest: version for version, digest in existing}
        for entry in entries:
            if entry.sha256 in target:
                tally.objects_unchanged += 1
            else:
                with archive.open_member(entry.member) as handle:
                    target[entry.sha256] = _put_object(clients, entry, handle)
                tally.objects_written += 1
            if entry.source_version_id is not None:
                mapping[(key, entry.source_version_id)] = target[entry.sha256]
    return mapping, conflicted


def _put_object(clients: AwsClients, entry: ObjectEntry, handle: IO[bytes]) -> str | None:
    s3 = clients.s3
    common: dict[str, Any] = {
        "Bucket": clients.config.bucket,
        "Key": entry.key,
        "ContentType": entry.content_type,
        "Metadata": {SHA256_METADATA: entry.sha256},
    }
    try:
        if entry.size <= _PART:
            checksum = base64.b64encode(bytes.fromhex(entry.sha256)).decode("ascii")
            response = s3.put_object(
                **common, Body=handle.read(), ContentLength=entry.size, ChecksumSHA256=checksum
            )
            return _version(response.get("VersionId"))
        return _put_multipart(s3, common, handle)
    except (ClientError, BotoCoreError) as exc:
        raise_store_error(exc, f"import {entry.key}")


def _put_multipart(s3: Any, common: dict[str, Any], handle: IO[bytes]) -> str | None:
    upload_id = s3.create_multipart_upload(**common)["UploadId"]
    target = {"Bucket": common["Bucket"], "Key": common["Key"], "UploadId": upload_id}
    try:
        parts: list[dict[str, Any]] = []
        while part := handle.read(_PART):
            number = len(parts) + 1
            response = s3.upload_part(**target, PartNumber=number, Body=part)
            parts.append({"ETag": response["ETag"], "PartNumber": number})
        completed = s3.complete_multipart_upload(**target, MultipartUpload={"Parts": parts})
    except BaseException:
        with contextlib.suppress(ClientError, BotoCoreError):
            s3.abort_multipart_upload(**target)
        raise
    return _version(completed.get("VersionId"))


def _key_text(spec: TableSpec, item: dict[str, Any]) -> str:
    names = [spec.partition_key.name] + ([spec.sort_key.name] if spec.sort_key else [])
    return "/".join(str(next(iter(item[name].values()))) for name in names)


def _comparable(item: dict[str, Any]) -> dict[str, Any]:
    return _encode_item(item)


def _import_table(
    clients: AwsClients,
    spec: TableSpec,
    *,
    lines: Iterator[dict[str, Any]],
    versions: dict[tuple[str, str], str | None],
    conflicted_keys: set[str],
    tally: _Tally,
) -> None:
    counts = tally.table(spec.role)
    ddb = clients.dynamodb
    name = clients.config.table_name(spec.role)
    for line in lines:
        item = _decode_item(line)
        key_text = _key_text(spec, item)
        if not _remap_pins(spec.role, item, versions, conflicted_keys):
            counts["conflicts"] += 1
            tally.conflict(spec.role.value, key_text, "the object it pins was not imported")
            continue
        fresh = _FRESHNESS.get(spec.role, "updated_at")
        request: dict[str, Any] = {
            "TableName": name,
            "Item": item,
            "ExpressionAttributeNames": {"#pk": spec.partition_key.name},
        }
        if fresh in item and "N" in item[fresh]:
            request["ConditionExpression"] = "attribute_not_exists(#pk) OR #fresh < :fresh"
            request["ExpressionAttributeNames"]["#fresh"] = fresh
            request["ExpressionAttributeValues"] = {":fresh": item[fresh]}
        else:
            request["ConditionExpression"] = "attribute_not_exists(#pk)"
        try:
            ddb.put_item(**request)
            counts["written"] += 1
            continue
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "ConditionalCheckFailedException":
                raise_store_error(exc, f"import {spec.role}")
        except BotoCoreError as exc:
            raise_store_error(exc, f"import {spec.role}")
        existing = _get(clients, spec, item)
        if existing is not None and _comparable(existing) == _comparable(item):
            counts["unchanged"] += 1
        elif existing is not None and _newer(existing, item, request):
            counts["kept_newer"] += 1
        else:
            counts["conflicts"] += 1
            tally.conflict(spec.role.value, key_text, "the target holds another item")


def _newer(existing: dict[str, Any], item: dict[str, Any], request: dict[str, Any]) -> bool:
    """Whether the target's item is strictly newer by the freshness attribute the put was conditioned on."""
    fresh = request["ExpressionAttributeNames"].get("#fresh")
    if fresh is None or "N" not in existing.get(fresh, {}):
        return False
    return int(existing[fresh]["N"]) > int(item[fresh]["N"])


def _get(clients: AwsClients, spec: TableSpec, item: dict[str, Any]) -> dict[str, Any] | None:
    key = {spec.partition_key.name: item[spec.partition_key.name]}
    if spec.sort_key is not None:
        key[spec.sort_key.name] = item[spec.sort_key.name]
    try:
        response = clients.dynamodb.get_item(
            TableName=clients.config.table_name(spec.role), Key=key, ConsistentRead=True
        )
    except (ClientError, BotoCoreError) as exc:
        raise_store_error(exc, f"import {spec.role}")
    return response.get("Item")


def _remap_pins(
    role: TableRole,
    item: dict[str, Any],
    versions: dict[tuple[str, str], str | None],
    conflicted_keys: set[str],
) -> bool:
    """Point pinned versions at their imported copies; False if a pinned object was not imported."""
    for key, version, path in _pins(role, item):
        if key in conflicted_keys:
            return False
        if (key, version) not in versions:
            # The source itself no longer held that version (expired): the record is kept as it was.
            continue
        container = item
        for step in path[:-1]:
            container = container[step]["M"]
        new_version = versions[(key, version)]
        if new_version is None:
            container.pop(path[-1], None)
        else:
            container[path[-1]] = {"S": new_version}
    return True


# --- verification ----------------------------------------------------------------------------------


def verify_deployment(store: Store, *, hash_objects: bool = True) -> VerificationReport:
    """Check what can be checked without any secret, failing closed on the first problem:

    every active room's signed manifest (hash, signature, room id, revision equal to the record's),
    every room's audit chain, every tenant's ledger chain and balance (``billing.verify_all``), and
    that every committed item and active agent source exists at its pinned version with its recorded
    size (and SHA-256 when ``hash_objects``). Wraps need the bearers' secrets and are not checked here.
    """
    clients = store.clients
    rooms = items = agents = audit_events = 0
    for raw in _scan(clients, SCHEMA.table(TableRole.ROOMS)):
        row = deserialize(raw)
        if row["sk"] == "manifest":
            audit_events += store.audit.verify(row["room_id"])
            if row.get("envelope") is None:
                continue
            _verify_room(row)
            rooms += 1
        elif row["sk"].startswith("item#") and row.get("state") == "committed":
            _verify_object(
                store,
                row["s3_key"],
                version_id=row.get("version_id"),
                size=row["size"],
                sha256=row["sha256"],
                hash_objects=hash_objects,
            )
            items += 1
    for raw in _scan(clients, SCHEMA.table(TableRole.AGENTS)):
        row = deserialize(raw)
        source = row.get("source_object")
        if row.get("state") == "active" and source is not None:
            _verify_object(
                store,
                source["key"],
                version_id=source.get("version_id"),
                size=source["size"],
                sha256=source["sha256"],
                hash_objects=hash_objects,
            )
            agents += 1
    ledger_entries = sum(store.billing.verify_all().values())
    return VerificationReport(
        rooms=rooms, audit_events=audit_events, ledger_entries=ledger_entries, items=items, agents=agents
    )


def _verify_room(row: dict[str, Any]) -> None:
    try:
        signed = SignedManifest.model_validate(row["envelope"])
    except ValidationError:
        raise IntegrityError(f"room {row['room_id']}: the stored envelope is not a signed manifest") from None
    manifest = verify_manifest(
        signed, expected_owner_sign_pub=None, expected_room_id=row["room_id"], min_revision=row["revision"]
    )
    if signed.manifest_hash != row["manifest_hash"] or manifest.revision != row["revision"]:
        raise IntegrityError(
            f"room {row['room_id']}: the record's hash or revision differs from its envelope",
            code="room_record_mismatch",
        )


def _verify_object(
    store: Store, key: str, *, version_id: str | None, size: int, sha256: str, hash_objects: bool
) -> None:
    s3 = store.clients.s3
    params: dict[str, Any] = {"Bucket": store.config.bucket, "Key": key}
    if version_id is not None:
        params["VersionId"] = version_id
    try:
        head = s3.head_object(**params)
    except ClientError as exc:
        raise IntegrityError(
            f"object {key} (version {version_id}) is missing", code="object_missing"
        ) from exc
    except BotoCoreError as exc:
        raise StoreError(f"inspect {key}: {type(exc).__name__}") from exc
    if head["ContentLength"] != size:
        raise IntegrityError(f"object {key} is not {size} bytes", code="object_size_mismatch")
    if hash_objects:
        hasher = hashlib.sha256()
        for chunk in store.blobs.iter_chunks(key, version_id=version_id):
            hasher.update(chunk)
        if hasher.hexdigest() != sha256:
            raise IntegrityError(f"object {key} does not match its SHA-256", code="object_checksum_mismatch")


__all__ = [
    "FORMAT",
    "ExportManifest",
    "ImportConflict",
    "ImportReport",
    "ObjectEntry",
    "TableCounts",
    "VerificationReport",
    "export_deployment",
    "import_archive",
    "read_manifest",
    "schema_digest",
    "verify_deployment",
]
