"""Small pieces shared by the room and agent services: text types, pagination, object deletion."""

from __future__ import annotations

import io
import unicodedata
from collections.abc import Iterator
from typing import Annotated, Any

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import AfterValidator, Field

from hivemind.errors import StoreError
from hivemind.store import Store
from hivemind.store.base import raise_store_error

# Display text (names, labels, content types): no control or format characters, so what a listing
# shows is what was stored (no terminal escapes, no bidi tricks).
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Zl", "Zp"})


def _printable(value: str) -> str:
    for character in value:
        if unicodedata.category(character) in _REFUSED_CATEGORIES:
            raise ValueError(f"contains a control or format character (U+{ord(character):04X})")
    if value != value.strip():
        raise ValueError("must not start or end with whitespace")
    return value


DisplayName = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_printable)]
Label = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_printable)]
ContentType = Annotated[
    str, Field(min_length=3, max_length=200, pattern=r"^[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+(;.*)?$")
]
MetadataKey = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
MetadataValue = Annotated[str, Field(max_length=1024), AfterValidator(_printable)]
PageLimit = Annotated[int, Field(ge=1, le=100)]


class ChunkReader(io.RawIOBase):
    """A read-only binary stream over an iterator of byte chunks (an S3 object read in chunks)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            try:
                self._pending = next(self._chunks)
            except StopIteration:
                return 0
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size


def delete_object_versions(store: Store, key: str) -> int:
    """Delete every version of exactly ``key`` (the bucket is versioned: a plain delete only hides).

    ``BlobStore.delete_prefix`` works on folders; an item is one key inside its room's folder.
    """
    s3 = store.clients.s3
    bucket = store.blobs.bucket
    removed = 0
    try:
        paginator = s3.get_paginator("list_object_versions")
        for page in paginator.paginate(Bucket=bucket, Prefix=key):
            targets = [
                {"Key": entry["Key"], "VersionId": entry["VersionId"]}
                for entry in page.get("Versions", []) + page.get("DeleteMarkers", [])
                if entry["Key"] == key
            ]
            if not targets:
                continue
            response = s3.delete_objects(Bucket=bucket, Delete={"Objects": targets, "Quiet": True})
            if response.get("Errors"):
                raise StoreError(f"delete {key}: {len(response['Errors'])} object versions were not deleted")
            removed += len(targets)
    except (ClientError, BotoCoreError) as exc:
        raise_store_error(exc, f"delete {key}")
    return removed
