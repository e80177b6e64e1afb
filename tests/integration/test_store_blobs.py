"""The bucket on a real moto server: presigned upload then verification, streaming, versions, deletion."""

from __future__ import annotations

import hashlib
import io
import os

import httpx
import pytest

from hivemind.errors import IntegrityError, InvalidInput, NotFound, PayloadTooLarge
from hivemind.store import AwsClients, Store
from hivemind.store.schema import item_key, room_prefix, run_output_key

pytestmark = pytest.mark.moto_server

DATA = b"HMS1" + os.urandom(4096)
DATA_SHA = hashlib.sha256(DATA).hexdigest()


def upload(store: Store, key: str, body: bytes, *, size: int, sha256: str) -> httpx.Response:
    presigned = store.blobs.presign_put(key, size=size, sha256=sha256)
    return httpx.put(presigned.url, content=body, headers=presigned.headers)


def test_presigned_put_then_verify_accepts_and_pins_the_version(store: Store) -> None:
    key = item_key("room_a", "item_1")
    presigned = store.blobs.presign_put(key, size=len(DATA), sha256=DATA_SHA)
    assert presigned.method == "PUT" and presigned.key == key
    # The URL signs the exact length and checksum, so real S3 refuses any other body.
    assert "content-length" in presigned.url and "x-amz-checksum-sha256" in presigned.url
    assert presigned.headers["Content-Length"] == str(len(DATA))
    response = httpx.put(presigned.url, content=DATA, headers=presigned.headers)
    assert response.status_code == 200

    stored = store.blobs.verify_uploaded(key, size=len(DATA), sha256=DATA_SHA)
    assert (stored.key, stored.size, stored.sha256) == (key, len(DATA), DATA_SHA)
    assert stored.version_id

    # An overwrite after the commit does not change what the pinned version reads.
    store.blobs.put_bytes(key, b"replaced later")
    assert store.blobs.get_bytes(key, version_id=stored.version_id) == DATA
    download = store.blobs.presign_get(key, version_id=stored.version_id)
    assert httpx.get(download.url).content == DATA


def test_verify_refuses_a_wrong_size(store: Store) -> None:
    key = item_key("room_a", "item_short")
    assert upload(
        store, key, DATA[:-1], size=len(DATA) - 1, sha256=hashlib.sha256(DATA[:-1]).hexdigest()
    ).is_success
    with pytest.raises(IntegrityError) as caught:
        store.blobs.verify_uploaded(key, size=len(DATA), sha256=DATA_SHA)
    assert caught.value.code == "upload_size_mismatch"


def test_verify_refuses_a_wrong_checksum(store: Store) -> None:
    """Even if storage accepted a body that does not match (moto does not check), the commit refuses it."""
    key = item_key("room_a", "item_tampered")
    tampered = bytes([DATA[0] ^ 1]) + DATA[1:]
    upload(store, key, tampered, size=len(DATA), sha256=DATA_SHA)
    with pytest.raises(IntegrityError) as caught:
        store.blobs.verify_uploaded(key, size=len(DATA), sha256=DATA_SHA)
    assert caught.value.code == "upload_checksum_mismatch"


def test_verify_refuses_a_missing_upload_and_bad_requests(store: Store) -> None:
    with pytest.raises(NotFound) as caught:
        store.blobs.verify_uploaded(item_key("room_a", "never"), size=10, sha256=DATA_SHA)
    assert caught.value.code == "upload_missing"
    with pytest.raises(InvalidInput):
        store.blobs.verify_uploaded(item_key("room_a", "never"), size=10, sha256="XYZ")
    with pytest.raises(PayloadTooLarge):
        store.blobs.presign_put("rooms/r/items/i", size=0, sha256=DATA_SHA)
    with pytest.raises(PayloadTooLarge):
        store.blobs.presign_put("rooms/r/items/i", size=6 * 1024**3, sha256=DATA_SHA)
    with pytest.raises(InvalidInput):
        store.blobs.presign_get("rooms/r/items/i", expires_in=7 * 24 * 3600)


def test_large_stream_uploads_in_parts_and_downloads_verified(store: Store) -> None:
    payload = os.urandom(9 * 1024 * 1024 + 123)  # more than one 8 MiB part
    key = run_output_key("run_big")
    stored = store.blobs.put_stream(key, io.BytesIO(payload))
    assert stored.size == len(payload) and stored.sha256 == hashlib.sha256(payload).hexdigest()
    assert (
        store.blobs.verify_uploaded(key, size=len(payload), sha256=stored.sha256).version_id
        == stored.version_id
    )

    sink = io.BytesIO()
    store.blobs.download_verified(stored, sink)
    assert sink.getvalue() == payload
    chunks = list(store.blobs.iter_chunks(key, chunk_size=1024 * 1024))
    assert max(len(chunk) for chunk in chunks) <= 1024 * 1024

    with pytest.raises(IntegrityError) as caught:
        store.blobs.download_verified(stored.model_copy(update={"sha256": "0" * 64}), io.BytesIO())
    assert caught.value.code == "object_checksum_mismatch"
    with pytest.raises(IntegrityError) as caught:
        store.blobs.download_verified(stored.model_copy(update={"size": len(payload) - 1}), io.BytesIO())
    assert caught.value.code == "object_size_mismatch"


def test_small_reads_are_capped(store: Store) -> None:
    store.blobs.put_bytes("runs/run_a/receipt.json", b"x" * 100)
    with pytest.raises(PayloadTooLarge):
        store.blobs.get_bytes("runs/run_a/receipt.json", max_size=99)
    with pytest.raises(NotFound):
        store.blobs.get_bytes("runs/run_a/missing")


def test_delete_prefix_removes_every_version_and_only_under_the_prefix(store: Store, aws: AwsClients) -> None:
    for version in range(3):
        store.blobs.put_bytes(item_key("room_gone", "item_1"), f"v{version}".encode())
    store.blobs.put_bytes(item_key("room_gone", "item_2"), b"x")
    store.blobs.put_bytes(item_key("room_gone2", "item_1"), b"kept")  # shares the text prefix, not the folder
    aws.s3.delete_object(
        Bucket=store.blobs.bucket, Key=item_key("room_gone", "item_2")
    )  # leaves a delete marker

    removed = store.blobs.delete_prefix(room_prefix("room_gone"))
    assert removed == 5  # item_1: 3 versions; item_2: 1 version and its delete marker
    listing = aws.s3.list_object_versions(Bucket=store.blobs.bucket, Prefix=room_prefix("room_gone"))
    assert not listing.get("Versions") and not listing.get("DeleteMarkers")
    assert store.blobs.exists(item_key("room_gone2", "item_1"))
    with pytest.raises(InvalidInput):
        store.blobs.delete_prefix("rooms")
