"""The bucket: presigned uploads and downloads, upload verification, streaming reads and writes (DESIGN §4).

Everything stored here is ciphertext or signed JSON. Clients upload straight to S3 with a presigned PUT
that signs the exact size and SHA-256 (S3 refuses any other body); the commit step then calls
:meth:`BlobStore.verify_uploaded`, which does not trust that and hashes the stored object itself, and
pins the exact object version it hashed so a later overwrite cannot slip in.

Objects never pass through memory whole: hashing, downloads and uploads stream in chunks.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
from collections.abc import Iterator
from typing import Any, BinaryIO, Literal

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import Field

from hivemind.errors import IntegrityError, InvalidInput, NotFound, PayloadTooLarge, StoreError
from hivemind.models import Sha256Hex, StrictModel, UnixSeconds
from hivemind.store.base import Clock, Record, raise_store_error
from hivemind.store.config import AwsClients

# A single S3 PUT carries at most 5 GiB; larger objects would need a multipart presigned flow.
MAX_PRESIGNED_UPLOAD = 5 * 1024**3
MAX_PRESIGN_SECONDS = 3600
CHUNK_SIZE = 1024 * 1024
_PART_SIZE = 8 * 1024 * 1024
_DELETE_BATCH = 1000


class StoredObject(Record):
    """An object whose size and SHA-256 were checked, pinned to the version that was checked."""

    key: str = Field(min_length=1, max_length=1024)
    size: int = Field(ge=0)
    sha256: Sha256Hex
    version_id: str | None = None


class PresignedUpload(StrictModel):
    """What a client needs to upload: PUT ``url`` with exactly these ``headers`` and the declared body."""

    method: Literal["PUT"] = "PUT"
    url: str
    headers: dict[str, str]
    key: str
    expires_at: UnixSeconds


class PresignedDownload(StrictModel):
    url: str
    expires_at: UnixSeconds


def _not_found(exc: ClientError) -> bool:
    error = exc.response.get("Error", {})
    return error.get("Code") in ("404", "NoSuchKey", "NoSuchVersion", "NotFound")


class BlobStore:
    def __init__(self, clients: AwsClients, clock: Clock) -> None:
        self._clients = clients
        self._clock = clock
        self.bucket = clients.config.bucket

    @property
    def _s3(self) -> Any:
        return self._clients.s3

    # --- presigned URLs --------------------------------------------------------------------------

    def presign_put(self, key: str, *, size: int, sha256: str, expires_in: int = 900) -> PresignedUpload:
        """A PUT URL for exactly ``size`` bytes whose SHA-256 is ``sha256`` (hex)."""
        if not 0 < size <= MAX_PRESIGNED_UPLOAD:
            raise PayloadTooLarge(f"an upload is 1 byte to {MAX_PRESIGNED_UPLOAD} bytes, not {size}")
        checksum = _checksum_header(sha256)
        expires_in = _clamp_expiry(expires_in)
        url = self._presign(
            "put_object",
            {"Bucket": self.bucket, "Key": key, "ContentLength": size, "ChecksumSHA256": checksum},
            expires_in,
        )
        return PresignedUpload(
            url=url,
            headers={"Content-Length": str(size), "x-amz-checksum-sha256": checksum},
            key=key,
            expires_at=self._clock() + expires_in,
        )

    def presign_get(
        self, key: str, *, version_id: str | None = None, expires_in: int = 300
    ) -> PresignedDownload:
        """A GET URL, pinned to ``version_id`` when given (use the version recorded at commit)."""
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if version_id is not None:
            params["VersionId"] = version_id
        expires_in = _clamp_expiry(expires_in)
        return PresignedDownload(
            url=self._presign("get_object", params, expires_in), expires_at=self._clock() + expires_in
        )

    def _presign(self, operation: str, params: dict[str, Any], expires_in: int) -> str:
        try:
            return self._s3.generate_presigned_url(operation, Params=params, ExpiresIn=expires_in)
        except (ClientError, BotoCoreError) as exc:
            raise_store_error(exc, "presign")

    # --- verification ----------------------------------------------------------------------------

    def verify_uploaded(self, key: str, *, size: int, sha256: str) -> StoredObject:
        """Check that ``key`` holds exactly ``size`` bytes hashing to ``sha256``; return the pinned object.

        The size is checked from the metadata first (cheap refusal), then the object version that was
        inspected is streamed and hashed, so a wrong checksum is found whatever S3 itself checked.
        """
        _checksum_header(sha256)
        head = self._head(key)
        if head is None:
            raise NotFound(f"nothing was uploaded to {key}", code="upload_missing")
        if head["ContentLength"] != size:
            raise IntegrityError(
                f"upload {key} is {head['ContentLength']} bytes, {size} were declared",
                code="upload_size_mismatch",
            )
        version_id = head.get("VersionId")
        digest, count = _hash_chunks(self.iter_chunks(key, version_id=version_id))
        if count != size:
            raise IntegrityError(
                f"upload {key} is {count} bytes, {size} were declared", code="upload_size_mismatch"
            )
        if digest != sha256:
            raise IntegrityError(
                f"upload {key} does not match its declared SHA-256", code="upload_checksum_mismatch"
            )
        return StoredObject(key=key, size=size, sha256=digest, version_id=version_id)

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            return self._s3.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _not_found(exc):
                return None
            raise_store_error(exc, f"inspect {key}")
        except BotoCoreError as exc:
            raise_store_error(exc, f"inspect {key}")

    # --- reads -----------------------------------------------------------------------------------

    def iter_chunks(
        self, key: str, *, version_id: str | None = None, chunk_size: int = CHUNK_SIZE
    ) -> Iterator[bytes]:
        """The object's bytes in chunks of at most ``chunk_size``."""
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if version_id is not None:
            params["VersionId"] = version_id
        try:
            body = self._s3.get_object(**params)["Body"]
        except ClientError as exc:
            if _not_found(exc):
                raise NotFound(f"no object {key}") from None
            raise_store_error(exc, f"read {key}")
        except BotoCoreError as exc:
            raise_store_error(exc, f"read {key}")
        try:
            yield from body.iter_chunks(chunk_size)
        except BotoCoreError as exc:
            raise_store_error(exc, f"read {key}")
        finally:
            body.close()

    def get_bytes(self, key: str, *, version_id: str | None = None, max_size: int = 8 * 1024 * 1024) -> bytes:
        """A small object (envelopes, receipts) read whole; larger than ``max_size`` is refused."""
        buffer = bytearray()
        for chunk in self.iter_chunks(key, version_id=version_id):
            buffer += chunk
            if len(buffer) > max_size:
                raise PayloadTooLarge(f"object {key} is larger than {max_size} bytes")
        return bytes(buffer)

    def download_verified(self, stored: StoredObject, sink: BinaryIO) -> None:
        """Copy the pinned version of ``stored`` into ``sink`` and check its size and SHA-256.

        On :class:`IntegrityError` the sink holds unverified bytes: the caller must discard it.
        """
        hasher = hashlib.sha256()
        count = 0
        for chunk in self.iter_chunks(stored.key, version_id=stored.version_id):
            hasher.update(chunk)
            count += len(chunk)
            if count > stored.size:
                raise IntegrityError(
                    f"object {stored.key} is longer than recorded", code="object_size_mismatch"
                )
            sink.write(chunk)
        if count != stored.size:
            raise IntegrityError(f"object {stored.key} is shorter than recorded", code="object_size_mismatch")
        if hasher.hexdigest() != stored.sha256:
            raise IntegrityError(
                f"object {stored.key} does not match its recorded SHA-256", code="object_checksum_mismatch"
            )

    # --- writes ----------------------------------------------------------------------------------

    def put_bytes(
        self, key: str, data: bytes, *, content_type: str = "application/octet-stream"
    ) -> StoredObject:
        try:
            response = self._s3.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)
        except (ClientError, BotoCoreError) as exc:
            raise_store_error(exc, f"write {key}")
        return StoredObject(
            key=key,
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            version_id=response.get("VersionId"),
        )

    def put_stream(
        self, key: str, stream: BinaryIO, *, content_type: str = "application/octet-stream"
    ) -> StoredObject:
        """Upload ``stream`` to its end in parts, hashing as it goes; memory use is one part."""
        part = _read_part(stream)
        if len(part) < _PART_SIZE:
            return self.put_bytes(key, part, content_type=content_type)
        hasher = hashlib.sha256()
        size = 0
        upload_id = self._call(
            "create_multipart_upload", Bucket=self.bucket, Key=key, ContentType=content_type
        )["UploadId"]
        try:
            parts: list[dict[str, Any]] = []
            while part:
                hasher.update(part)
                size += len(part)
                number = len(parts) + 1
                response = self._call(
                    "upload_part",
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=part,
                )
                parts.append({"ETag": response["ETag"], "PartNumber": number})
                part = _read_part(stream)
            completed = self._call(
                "complete_multipart_upload",
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            with contextlib.suppress(ClientError, BotoCoreError):
                self._s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            raise
        return StoredObject(
            key=key, size=size, sha256=hasher.hexdigest(), version_id=completed.get("VersionId")
        )

    def delete_prefix(self, prefix: str) -> int:
        """Delete every version of every object under ``prefix`` (the bucket is versioned, so a plain
        delete would only hide them). Returns how many versions and delete markers were removed."""
        if not prefix.endswith("/") or prefix.startswith("/"):
            raise InvalidInput("a deletion prefix is a folder path ending in '/'")
        removed = 0
        paginator = self._s3.get_paginator("list_object_versions")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                targets = [
                    {"Key": entry["Key"], "VersionId": entry["VersionId"]}
                    for entry in page.get("Versions", []) + page.get("DeleteMarkers", [])
                ]
                for start in range(0, len(targets), _DELETE_BATCH):
                    batch = targets[start : start + _DELETE_BATCH]
                    response = self._s3.delete_objects(
                        Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                    )
                    if response.get("Errors"):
                        raise StoreError(
                            f"delete {prefix}: {len(response['Errors'])} object versions were not deleted"
                        )
                    removed += len(batch)
        except (ClientError, BotoCoreError) as exc:
            raise_store_error(exc, f"delete {prefix}")
        return removed

    def _call(self, operation: str, **params: Any) -> dict[str, Any]:
        try:
            return getattr(self._s3, operation)(**params)
        except (ClientError, BotoCoreError) as exc:
            raise_store_error(exc, f"{operation} {params.get('Key', '')}")


def _checksum_header(sha256: str) -> str:
    """Hex SHA-256 to the standard-base64 form S3 checksum headers use."""
    try:
        raw = bytes.fromhex(sha256)
    except (ValueError, TypeError):
        raise InvalidInput("sha256 must be 64 lowercase hex digits") from None
    if len(raw) != 32 or sha256 != sha256.lower():
        raise InvalidInput("sha256 must be 64 lowercase hex digits")
    return base64.b64encode(raw).decode("ascii")


def _clamp_expiry(expires_in: int) -> int:
    if not 0 < expires_in <= MAX_PRESIGN_SECONDS:
        raise InvalidInput(f"presigned URLs live 1 to {MAX_PRESIGN_SECONDS} seconds")
    return expires_in


def _hash_chunks(chunks: Iterator[bytes]) -> tuple[str, int]:
    hasher = hashlib.sha256()
    count = 0
    for chunk in chunks:
        hasher.update(chunk)
        count += len(chunk)
    return hasher.hexdigest(), count


def _read_part(stream: BinaryIO) -> bytes:
    """Exactly one part's worth of bytes, or fewer only at the end of the stream."""
    buffer = bytearray()
    while len(buffer) < _PART_SIZE:
        chunk = stream.read(_PART_SIZE - len(buffer))
        if not chunk:
            break
        buffer += chunk
    return bytes(buffer)
