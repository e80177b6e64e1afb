"""Room items as the scoped-data engine sees them, and the document side of the items tools.

An item is decrypted plaintext the runner can open as often as it needs (:class:`RoomItem`), with its
description (:class:`ItemInfo`). :func:`item_kind` decides whether it is tabular (loaded into the
SQL database) or a document (served by ``GET /v1/tools/items[/{id}]``).

For the query stage, only documents pass, only those the policy's ``items.allow`` names, and their
text after ``items.redact``. Tabular items reach the query stage only as their scoped tables, never as
raw files, whatever the allow-list says: a raw CSV would carry every column and row the policy hides.
The scope stage (full read) sees every item, raw.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Annotated, BinaryIO

from pydantic import Field

from hivemind.errors import Forbidden, InvalidInput, NotFound, PayloadTooLarge
from hivemind.models import Identifier, StrictModel
from hivemind.policy import ItemsPolicy

TABLE_METADATA_KEY = "table"

ItemText = Annotated[str, Field(min_length=1, max_length=1024)]


class ItemInfo(StrictModel):
    """What the runner knows about an item besides its bytes (the control plane's item record)."""

    id: Identifier
    name: ItemText
    content_type: Annotated[str, Field(min_length=1, max_length=255)]
    size: int = Field(ge=0, description="plaintext size in bytes")
    metadata: dict[Annotated[str, Field(min_length=1, max_length=256)], ItemText] = Field(
        default_factory=dict, max_length=64
    )


class ItemContent(StrictModel):
    """One item as ``GET /v1/tools/items/{id}`` returns it: exactly one of ``text`` and ``base64``."""

    id: str
    name: str
    content_type: str
    metadata: dict[str, str]
    text: str | None
    base64: str | None


@dataclass(frozen=True)
class RoomItem:
    """An item and a way to read its plaintext from the start; ``open()`` returns a new stream each
    time and the caller closes it (the pipeline opens HMS1 blobs with ``hivemind.seal.SealReader``)."""

    info: ItemInfo
    open: Callable[[], BinaryIO] = field(repr=False)

    @classmethod
    def from_bytes(cls, info: ItemInfo, data: bytes) -> RoomItem:
        frozen = bytes(data)
        return cls(info, lambda: io.BytesIO(frozen))

    @classmethod
    def from_path(cls, info: ItemInfo, path: Path) -> RoomItem:
        return cls(info, lambda: path.open("rb"))


class ItemKind(StrEnum):
    CSV = "csv"
    TSV = "tsv"
    JSONL = "jsonl"
    SQLITE = "sqlite"
    PARQUET = "parquet"
    DOCUMENT = "document"

    @property
    def tabular(self) -> bool:
        return self is not ItemKind.DOCUMENT


_KIND_BY_MEDIA_TYPE = {
    "text/csv": ItemKind.CSV,
    "application/csv": ItemKind.CSV,
    "text/tab-separated-values": ItemKind.TSV,
    "application/x-ndjson": ItemKind.JSONL,
    "application/ndjson": ItemKind.JSONL,
    "application/jsonl": ItemKind.JSONL,
    "application/x-jsonlines": ItemKind.JSONL,
    "application/jsonlines": ItemKind.JSONL,
    "application/json-lines": ItemKind.JSONL,
    "application/vnd.sqlite3": ItemKind.SQLITE,
    "application/x-sqlite3": ItemKind.SQLITE,
    "application/vnd.apache.parquet": ItemKind.PARQUET,
    "application/x-parquet": ItemKind.PARQUET,
}
_KIND_BY_SUFFIX = {
    ".csv": ItemKind.CSV,
    ".tsv": ItemKind.TSV,
    ".jsonl": ItemKind.JSONL,
    ".ndjson": ItemKind.JSONL,
    ".sqlite": ItemKind.SQLITE,
    ".sqlite3": ItemKind.SQLITE,
    ".db": ItemKind.SQLITE,
    ".parquet": ItemKind.PARQUET,
}
# Media types that say too little; the file name's suffix decides for them.
_GENERIC_MEDIA_TYPES = frozenset(
    {"application/octet-stream", "binary/octet-stream", "text/plain", "application/json"}
)
_TEXT_MEDIA_TYPES = frozenset(
    {
        "application/json",
        "application/xml",
        "application/yaml",
        "application/x-yaml",
        "application/toml",
        "application/sql",
        "application/javascript",
        "application/csv",
        *(media for media, kind in _KIND_BY_MEDIA_TYPE.items() if kind is ItemKind.JSONL),
    }
)


def media_type(content_type: str) -> str:
    """``content_type`` without parameters, lowercase: ``Text/CSV; charset=utf-8`` -> ``text/csv``."""
    return content_type.split(";", 1)[0].strip().lower()


def item_kind(info: ItemInfo) -> ItemKind:
    """Tabular format or document, from the media type, or the name's suffix for generic types."""
    media = media_type(info.content_type)
    kind = _KIND_BY_MEDIA_TYPE.get(media)
    if kind is not None:
        return kind
    if media in _GENERIC_MEDIA_TYPES:
        return _KIND_BY_SUFFIX.get(Path(info.name).suffix.lower(), ItemKind.DOCUMENT)
    return ItemKind.DOCUMENT


def is_text(info: ItemInfo) -> bool:
    """Whether the item is served as text (if it decodes as UTF-8) rather than base64."""
    media = media_type(info.content_type)
    return (
        media.startswith("text/")
        or media in _TEXT_MEDIA_TYPES
        or media.endswith(("+json", "+xml"))
        or item_kind(info) in (ItemKind.CSV, ItemKind.TSV, ItemKind.JSONL)
    )


def _read_capped(item: RoomItem, cap: int) -> bytes:
    if item.info.size > cap:
        raise PayloadTooLarge(
            f"item {item.info.id} is {item.info.size} bytes; the items tool serves at most {cap}",
            code="item_too_large",
        )
    chunks: list[bytes] = []
    total = 0
    with item.open() as stream:
        while total <= cap:
            chunk = stream.read(min(1024 * 1024, cap + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    if total > cap:
        raise PayloadTooLarge(
            f"item {item.info.id} is larger than the {cap} bytes the items tool serves", code="item_too_large"
        )
    return b"".join(chunks)


class DocumentShelf:
    """The items tools over a fixed set of items.

    ``policy=None`` is the scope stage's full read: every item, raw. With an :class:`ItemsPolicy`
    (query stage): documents the allow-list names, text redacted, binary only when there is nothing to
    redact. An item the caller may not read is reported exactly like one that does not exist.
    """

    def __init__(self, items: Sequence[RoomItem], *, policy: ItemsPolicy | None, max_document_bytes: int):
        by_id: dict[str, RoomItem] = {}
        for item in items:
            if item.info.id in by_id:
                raise InvalidInput(f"item {item.info.id} is listed twice")
            by_id[item.info.id] = item
        self._policy = policy
        self._max_document_bytes = max_document_bytes
        self._visible = {
            item_id: item
            for item_id, item in by_id.items()
            if policy is None
            or (item_kind(item.info) is ItemKind.DOCUMENT and policy.allows(item_id, item.info.metadata))
        }

    def list(self) -> list[ItemInfo]:
        return [item.info for item in self._visible.values()]

    def read(self, item_id: str) -> ItemContent:
        item = self._visible.get(item_id)
        if item is None:
            raise NotFound("no such item")
        data = _read_capped(item, self._max_document_bytes)
        text: str | None = None
        if is_text(item.info):
            try:
                text = data.decode("utf-8-sig")
            except UnicodeDecodeError:
                text = None  # mislabelled binary: served as bytes, and only when nothing needs redacting
        if self._policy is not None:
            if text is not None:
                text = self._policy.redact_text(text)
            elif self._policy.redact:
                raise Forbidden(
                    f"item {item_id} is binary and the scope redacts patterns from items; bytes cannot be "
                    "redacted",
                    code="item_not_redactable",
                )
        info = item.info
        return ItemContent(
            id=info.id,
            name=info.name,
            content_type=info.content_type,
            metadata=dict(info.metadata),
            text=text,
            base64=None if text is not None else base64.b64encode(data).decode("ascii"),
        )
