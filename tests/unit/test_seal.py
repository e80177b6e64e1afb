"""HMS1 streaming AEAD (DESIGN §4): round trips, format conformance, and refusal of every tampering."""

from __future__ import annotations

import gc
import hashlib
import io
import os
import re
import struct
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import ValidationError

from hivemind import seal
from hivemind.errors import InvalidInput, SealError
from hivemind.models import ObjectKind
from hivemind.seal import (
    DEFAULT_CHUNK_SIZE,
    HEADER_SIZE,
    TAG_SIZE,
    SealContext,
    SealReader,
    SealWriter,
    agent_source_context,
    open_bytes,
    open_stream,
    seal_bytes,
    seal_stream,
    sealed_size,
)

KEY = bytes(range(32))
CHUNK = 4096
SEGMENT = CHUNK + TAG_SIZE
CONTEXT = SealContext(tenant_id="tenant_1", room_id="room_1", kind=ObjectKind.ITEM, object_id="item_1")
SIZES = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK]
REPO = Path(__file__).resolve().parents[2]


def payload(size: int) -> bytes:
    return os.urandom(size)


def sealed_blob(data: bytes, chunk_size: int = CHUNK) -> bytes:
    return seal_bytes(data, key=KEY, context=CONTEXT, chunk_size=chunk_size)


def segment_start(index: int) -> int:
    return HEADER_SIZE + index * SEGMENT


# --- reference implementation, written from the spec only ---------------------------------------


def reference_key(key: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(key)


def reference_seal(data: bytes, key: bytes, salt: bytes, info: bytes, chunk_size: int) -> bytes:
    header = b"HMS1" + bytes([1]) + struct.pack(">I", chunk_size) + salt
    aead = AESGCM(reference_key(key, salt, info))
    pieces = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)] or [b""]
    out = [header]
    for index, piece in enumerate(pieces):
        flag = b"\x01" if index == len(pieces) - 1 else b"\x00"
        out.append(aead.encrypt(index.to_bytes(11, "big") + flag, piece, header))
    return b"".join(out)


def reference_open(blob: bytes, key: bytes, info: bytes) -> bytes:
    magic, version, chunk_size, salt = struct.unpack(">4sBI16s", blob[:25])
    assert (magic, version) == (b"HMS1", 1)
    aead = AESGCM(reference_key(key, salt, info))
    segments = [blob[i : i + chunk_size + 16] for i in range(25, len(blob), chunk_size + 16)]
    out = []
    for index, segment in enumerate(segments):
        flag = b"\x01" if index == len(segments) - 1 else b"\x00"
        out.append(aead.decrypt(index.to_bytes(11, "big") + flag, segment, blob[:25]))
    return b"".join(out)


# Known-answer vector (also in docs/sealing.md): key 00..1f, salt a0..af, chunk size 4096.
VECTOR_SALT = bytes(range(0xA0, 0xB0))
VECTOR_PLAINTEXT = b"hello, room"
VECTOR_BLOB = bytes.fromhex(
    "484d53310100001000a0a1a2a3a4a5a6a7a8a9aaabacadaeaf1d98dd703b49a3d525a49b90fdee1b7306216b2a551f604b52a337"
)


def test_context_info_is_domain_separated_and_binds_every_field() -> None:
    assert CONTEXT.hkdf_info() == b"hivemind/v1/hms1|tenant_1|room_1|item|item_1"
    other = SealContext(tenant_id="t", room_id="r", kind=ObjectKind.AGENT_SOURCE, object_id="a/b c")
    assert other.hkdf_info() == b"hivemind/v1/hms1|t|r|agent_source|a/b c"


def test_agent_source_context_binds_owner_room_and_agent() -> None:
    library = agent_source_context("tn_owner1", None, "agent_a")
    assert library.hkdf_info() == b"hivemind/v1/hms1|tn_owner1|none|agent_source|agent_a"
    in_room = agent_source_context("tn_owner1", "room_abc", "agent_a")
    assert in_room.hkdf_info() == b"hivemind/v1/hms1|tn_owner1|room_abc|agent_source|agent_a"
    blob = seal_bytes(b"agent source", key=KEY, context=library)
    assert open_bytes(blob, key=KEY, context=agent_source_context("tn_owner1", None, "agent_a")) == (
        b"agent source"
    )
    # Moved into a room, to another agent or to another owner, the sealed source does not open.
    other_agent = agent_source_context("tn_owner1", None, "agent_b")
    other_owner = agent_source_context("tn_other1", None, "agent_a")
    for moved in (in_room, other_agent, other_owner):
        with pytest.raises(SealError):
            open_bytes(blob, key=KEY, context=moved)


def test_known_answer_vector() -> None:
    assert reference_seal(VECTOR_PLAINTEXT, KEY, VECTOR_SALT, CONTEXT.hkdf_info(), CHUNK) == VECTOR_BLOB
    assert open_bytes(VECTOR_BLOB, key=KEY, context=CONTEXT) == VECTOR_PLAINTEXT


@pytest.mark.parametrize("size", SIZES)
def test_format_matches_the_reference_implementation(size: int) -> None:
    data = payload(size)
    blob = sealed_blob(data)
    assert blob[:4] == b"HMS1"
    assert blob[4] == 1
    assert int.from_bytes(blob[5:9], "big") == CHUNK
    assert reference_open(blob, KEY, CONTEXT.hkdf_info()) == data
    by_reference = reference_seal(data, KEY, os.urandom(16), CONTEXT.hkdf_info(), CHUNK)
    assert open_bytes(by_reference, key=KEY, context=CONTEXT) == data


def test_every_seal_uses_a_fresh_salt() -> None:
    first, second = sealed_blob(b"same"), sealed_blob(b"same")
    assert first[9:25] != second[9:25]
    assert first[25:] != second[25:]


# --- round trips -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_bytes_round_trip_and_size(size: int) -> None:
    data = payload(size)
    blob = sealed_blob(data)
    assert len(blob) == sealed_size(size, CHUNK)
    assert open_bytes(blob, key=KEY, context=CONTEXT) == data


@pytest.mark.parametrize("size", SIZES)
def test_stream_round_trip_with_stats(size: int) -> None:
    data = payload(size)
    sealed = io.BytesIO()
    sealing = seal_stream(io.BytesIO(data), sealed, key=KEY, context=CONTEXT, chunk_size=CHUNK)
    blob = sealed.getvalue()
    opened = io.BytesIO()
    opening = open_stream(io.BytesIO(blob), opened, key=KEY, context=CONTEXT)
    assert opened.getvalue() == data
    assert sealing == opening
    assert sealing.plaintext_size == size
    assert sealing.plaintext_sha256 == hashlib.sha256(data).hexdigest()
    assert sealing.sealed_size == len(blob) == sealed_size(size, CHUNK)
    assert sealing.sealed_sha256 == hashlib.sha256(blob).hexdigest()
    assert sealing.chunk_size == CHUNK
    assert open_bytes(blob, key=KEY, context=CONTEXT) == data


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("piece", [1000, CHUNK, 2 * CHUNK + 7])
def test_writer_reader_round_trip(size: int, piece: int) -> None:
    data = payload(size)
    sink = io.BytesIO()
    with SealWriter(sink, key=KEY, context=CONTEXT, chunk_size=CHUNK) as writer:
        for start in range(0, size, piece):
            assert writer.write(data[start : start + piece]) == len(data[start : start + piece])
    blob = sink.getvalue()
    assert len(blob) == sealed_size(size, CHUNK)
    assert open_bytes(blob, key=KEY, context=CONTEXT) == data
    reader = SealReader(io.BytesIO(blob), key=KEY, context=CONTEXT)
    assert reader.read() == data
    assert reader.read() == b""


def test_default_chunk_size_round_trip() -> None:
    data = payload(2 * DEFAULT_CHUNK_SIZE + 12345)
    blob = seal_bytes(data, key=KEY, context=CONTEXT)
    assert int.from_bytes(blob[5:9], "big") == DEFAULT_CHUNK_SIZE
    assert len(blob) == sealed_size(len(data))
    opened = io.BytesIO()
    open_stream(io.BytesIO(blob), opened, key=KEY, context=CONTEXT)
    assert opened.getvalue() == data


def test_sources_without_readinto_and_sinks_with_short_writes() -> None:
    class ReadOnly:
        def __init__(self, data: bytes):
            self._inner = io.BytesIO(data)

        def read(self, size: int = -1) -> bytes:
            return self._inner.read(min(size, 1000))

    class ShortWrites(io.RawIOBase):
        def __init__(self) -> None:
            self.data = bytearray()

        def writable(self) -> bool:
            return True

        def write(self, view: memoryview) -> int:  # type: ignore[override]
            taken = bytes(view[:777])
            self.data += taken
            return len(taken)

    data = payload(3 * CHUNK + 5)
    sealed = ShortWrites()
    seal_stream(ReadOnly(data), sealed, key=KEY, context=CONTEXT, chunk_size=CHUNK)  # type: ignore[arg-type]
    opened = ShortWrites()
    open_stream(ReadOnly(bytes(sealed.data)), opened, key=KEY, context=CONTEXT)  # type: ignore[arg-type]
    assert bytes(opened.data) == data


# --- tampering: exhaustive single-byte flips ---------------------------------------------------------


def _open_everywhere(blob: bytes) -> list[SealError]:
    """Open through all three readers; each must refuse, and they must agree on why."""
    errors = []
    for opener in (
        lambda: open_bytes(blob, key=KEY, context=CONTEXT),
        lambda: open_stream(io.BytesIO(blob), io.BytesIO(), key=KEY, context=CONTEXT),
        lambda: SealReader(io.BytesIO(blob), key=KEY, context=CONTEXT).read(),
    ):
        with pytest.raises(SealError) as caught:
            opener()
        errors.append(caught.value)
    assert len({(e.code, e.details.get("chunk")) for e in errors}) == 1, [str(e) for e in errors]
    return errors


def test_every_single_byte_flip_is_refused() -> None:
    data = payload(2 * CHUNK + 100)  # chunks 0 and 1 full, chunk 2 short
    blob = sealed_blob(data)
    for position in range(len(blob)):
        tampered = bytearray(blob)
        tampered[position] ^= 0x01
        error = _open_everywhere(bytes(tampered))[0]
        if position < 4:
            assert error.code == seal.BAD_MAGIC
        elif position == 4:
            assert error.code == seal.UNSUPPORTED_VERSION
        elif position < 9:
            # A changed chunk size is out of bounds, or re-cuts the chunks and breaks the tags.
            assert error.code in {seal.BAD_CHUNK_SIZE, seal.TAG_MISMATCH, seal.TRUNCATED}, position
        elif position < HEADER_SIZE:
            assert (error.code, error.details["chunk"]) == (seal.TAG_MISMATCH, 0), position
        else:
            chunk = (position - HEADER_SIZE) // SEGMENT
            assert (error.code, error.details["chunk"]) == (seal.TAG_MISMATCH, chunk), position


def test_every_value_of_every_header_byte_is_refused() -> None:
    blob = sealed_blob(payload(CHUNK + 1))
    for position in range(HEADER_SIZE):
        for value in range(256):
            if value == blob[position]:
                continue
            tampered = bytearray(blob)
            tampered[position] = value
            with pytest.raises(SealError):
                open_bytes(bytes(tampered), key=KEY, context=CONTEXT)


def test_a_failing_chunk_never_reaches_the_destination() -> None:
    data = payload(3 * CHUNK)
    tampered = bytearray(sealed_blob(data))
    tampered[segment_start(1) + 10] ^= 0x80
    sink = io.BytesIO()
    with pytest.raises(SealError) as caught:
        open_stream(io.BytesIO(bytes(tampered)), sink, key=KEY, context=CONTEXT)
    assert caught.value.details == {"chunk": 1}
    # Chunk 0 verified and was written; nothing of chunk 1 was.
    assert sink.getvalue() == data[:CHUNK]


# --- truncation, reordering, replay, appending --------------------------------------------------------


def test_truncation_anywhere_is_refused() -> None:
    blob = sealed_blob(payload(3 * CHUNK))  # three full chunks: the last one is full too
    for length in range(len(blob)):
        error = _open_everywhere(blob[:length])[0]
        if length < HEADER_SIZE:
            assert error.code == seal.TRUNCATED
        elif length == HEADER_SIZE:
            assert error.code == seal.TRUNCATED and "no chunks" in error.message
        elif (length - HEADER_SIZE) % SEGMENT == 0:
            # Cut at a chunk boundary: every remaining chunk verifies, but none is the last.
            chunk = (length - HEADER_SIZE) // SEGMENT - 1
            assert (error.code, error.details["chunk"]) == (seal.TRUNCATED, chunk), length
        else:
            chunk = (length - HEADER_SIZE) // SEGMENT
            assert error.code in {seal.TAG_MISMATCH, seal.TRUNCATED}, length
            assert error.details.get("chunk", chunk) == chunk


def test_truncation_of_a_stream_with_a_short_last_chunk() -> None:
    blob = sealed_blob(payload(2 * CHUNK + 1))
    for chunks in (1, 2):
        error = _open_everywhere(blob[: segment_start(chunks)])[0]
        assert (error.code, error.details["chunk"]) == (seal.TRUNCATED, chunks - 1)


def _segments(blob: bytes) -> list[bytes]:
    return [blob[i : i + SEGMENT] for i in range(HEADER_SIZE, len(blob), SEGMENT)]


def test_reordered_chunks_are_refused() -> None:
    blob = sealed_blob(payload(3 * CHUNK))
    s0, s1, s2 = _segments(blob)
    error = _open_everywhere(blob[:HEADER_SIZE] + s1 + s0 + s2)[0]
    assert (error.code, error.details["chunk"]) == (seal.TAG_MISMATCH, 0)
    error = _open_everywhere(blob[:HEADER_SIZE] + s0 + s2 + s1)[0]
    assert (error.code, error.details["chunk"]) == (seal.TAG_MISMATCH, 1)


def test_replayed_or_dropped_chunks_are_refused() -> None:
    blob = sealed_blob(payload(3 * CHUNK))
    s0, s1, s2 = _segments(blob)
    header = blob[:HEADER_SIZE]
    assert _open_everywhere(header + s0 + s0 + s1 + s2)[0].details["chunk"] == 1
    assert _open_everywhere(header + s0 + s2)[0].details["chunk"] == 1
    replayed_last = _open_everywhere(header + s0 + s1 + s2 + s2)[0]
    assert (replayed_last.code, replayed_last.details["chunk"]) == (seal.TRAILING_DATA, 2)


def test_chunks_from_another_blob_are_refused() -> None:
    data = payload(2 * CHUNK + 9)
    first, second = sealed_blob(data), sealed_blob(data)  # same key, context and data; other salt
    spliced = first[: segment_start(1)] + second[segment_start(1) :]
    assert _open_everywhere(spliced)[0].details["chunk"] == 1
    rehead = second[:HEADER_SIZE] + first[HEADER_SIZE:]
    assert _open_everywhere(rehead)[0].details["chunk"] == 0


@pytest.mark.parametrize(
    "extra",
    [b"\x00", bytes(TAG_SIZE), os.urandom(SEGMENT), os.urandom(SEGMENT + 3)],
    ids=["one-byte", "one-tag", "one-chunk", "more-than-a-chunk"],
)
def test_appended_bytes_are_refused(extra: bytes) -> None:
    full_last = sealed_blob(payload(2 * CHUNK))
    error = _open_everywhere(full_last + extra)[0]
    assert (error.code, error.details["chunk"]) == (seal.TRAILING_DATA, 1)
    # After a short last chunk the extra bytes run into it, so its tag no longer verifies.
    short_last = sealed_blob(payload(CHUNK + 10))
    error = _open_everywhere(short_last + extra)[0]
    assert (error.code, error.details["chunk"]) == (seal.TAG_MISMATCH, 1)


def test_an_empty_last_chunk_after_data_is_refused() -> None:
    # Only a key holder can build this; HMS1 writers never do, so sealed sizes stay exact.
    salt = os.urandom(16)
    header = b"HMS1\x01" + struct.pack(">I", CHUNK) + salt
    aead = AESGCM(reference_key(KEY, salt, CONTEXT.hkdf_info()))
    blob = (
        header
        + aead.encrypt(bytes(11) + b"\x00", bytes(CHUNK), header)
        + aead.encrypt((1).to_bytes(11, "big") + b"\x01", b"", header)
    )
    error = _open_everywhere(blob)[0]
    assert (error.code, error.details["chunk"]) == (seal.MALFORMED, 1)


# --- keys, contexts and headers -----------------------------------------------------------------------


def test_wrong_key_is_refused() -> None:
    blob = sealed_blob(payload(100))
    with pytest.raises(SealError) as caught:
        open_bytes(blob, key=bytes(32), context=CONTEXT)
    assert (caught.value.code, caught.value.details["chunk"]) == (seal.TAG_MISMATCH, 0)


@pytest.mark.parametrize(
    "change",
    [
        {"tenant_id": "tenant_2"},
        {"room_id": "room_2"},
        {"kind": ObjectKind.ARTIFACT},
        {"object_id": "item_2"},
    ],
)
def test_another_context_is_refused(change: dict[str, object]) -> None:
    blob = sealed_blob(payload(CHUNK + 1))
    moved = CONTEXT.model_copy(update=change)
    for opener in (
        lambda: open_bytes(blob, key=KEY, context=moved),
        lambda: open_stream(io.BytesIO(blob), io.BytesIO(), key=KEY, context=moved),
        lambda: SealReader(io.BytesIO(blob), key=KEY, context=moved).read(),
    ):
        with pytest.raises(SealError) as caught:
            opener()
        assert (caught.value.code, caught.value.details["chunk"]) == (seal.TAG_MISMATCH, 0)


def _with_header(blob: bytes, *, magic: bytes = b"HMS1", version: int = 1, chunk_size: int = CHUNK) -> bytes:
    return magic + bytes([version]) + struct.pack(">I", chunk_size) + blob[9:]


@pytest.mark.parametrize(
    ("blob_of", "code"),
    [
        (lambda blob: _with_header(blob, magic=b"HMS2"), seal.BAD_MAGIC),
        (lambda blob: b"PK\x03\x04" + blob[4:], seal.BAD_MAGIC),
        (lambda blob: _with_header(blob, version=2), seal.UNSUPPORTED_VERSION),
        (lambda blob: _with_header(blob, version=0), seal.UNSUPPORTED_VERSION),
        (lambda blob: _with_header(blob, chunk_size=0), seal.BAD_CHUNK_SIZE),
        (lambda blob: _with_header(blob, chunk_size=4095), seal.BAD_CHUNK_SIZE),
        (lambda blob: _with_header(blob, chunk_size=16 * 1024 * 1024 + 1), seal.BAD_CHUNK_SIZE),
        (lambda blob: b"", seal.TRUNCATED),
        (lambda blob: b"HM", seal.TRUNCATED),
        (lambda blob: blob[: HEADER_SIZE - 1], seal.TRUNCATED),
    ],
)
def test_bad_headers_are_refused_with_their_reason(blob_of: Callable[[bytes], bytes], code: str) -> None:
    error = _open_everywhere(blob_of(sealed_blob(b"data")))[0]
    assert error.code == code


def test_seal_errors_are_integrity_errors_with_a_stable_family() -> None:
    with pytest.raises(SealError) as caught:
        open_bytes(b"not sealed at all", key=KEY, context=CONTEXT)
    assert caught.value.status == 409
    assert caught.value.to_dict()["error"] == seal.BAD_MAGIC


@pytest.mark.parametrize("field", ["tenant_id", "room_id", "object_id"])
@pytest.mark.parametrize("value", ["a|b", "", "line\nbreak", "x" * 257])
def test_context_fields_that_could_be_ambiguous_are_rejected(field: str, value: str) -> None:
    fields = {"tenant_id": "t", "room_id": "r", "kind": ObjectKind.ITEM, "object_id": "o"}
    with pytest.raises(ValidationError):
        SealContext(**{**fields, field: value})


def test_context_is_frozen_keyword_only_and_kind_is_checked() -> None:
    with pytest.raises(ValidationError):
        SealContext(tenant_id="t", room_id="r", kind="nonsense", object_id="o")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        SealContext("t", "r", ObjectKind.ITEM, "o")  # type: ignore[misc]
    with pytest.raises(ValidationError):
        CONTEXT.room_id = "room_2"  # type: ignore[misc]


@pytest.mark.parametrize("key", [b"", bytes(16), bytes(33)])
def test_keys_must_be_32_bytes(key: bytes) -> None:
    with pytest.raises(InvalidInput):
        seal_bytes(b"x", key=key, context=CONTEXT)
    with pytest.raises(InvalidInput):
        SealWriter(io.BytesIO(), key=key, context=CONTEXT)
    with pytest.raises(InvalidInput):
        open_bytes(sealed_blob(b"x"), key=key, context=CONTEXT)


def test_context_must_be_a_seal_context() -> None:
    with pytest.raises(InvalidInput):
        seal_bytes(b"x", key=KEY, context=CONTEXT.hkdf_info())  # type: ignore[arg-type]


@pytest.mark.parametrize("chunk_size", [0, 4095, 16 * 1024 * 1024 + 1, 4096.0, True])
def test_chunk_size_is_bounded(chunk_size: int) -> None:
    with pytest.raises(InvalidInput):
        seal_bytes(b"x", key=KEY, context=CONTEXT, chunk_size=chunk_size)
    with pytest.raises(InvalidInput):
        seal_stream(io.BytesIO(b"x"), io.BytesIO(), key=KEY, context=CONTEXT, chunk_size=chunk_size)
    with pytest.raises(InvalidInput):
        sealed_size(1, chunk_size)


def test_sealed_size() -> None:
    assert sealed_size(0, CHUNK) == 25 + 16
    assert sealed_size(1, CHUNK) == 25 + 1 + 16
    assert sealed_size(CHUNK, CHUNK) == 25 + CHUNK + 16
    assert sealed_size(CHUNK + 1, CHUNK) == 25 + CHUNK + 1 + 32
    assert sealed_size(10 * 1024**3) == 25 + 10 * 1024**3 + 10 * 1024 * 16
    with pytest.raises(InvalidInput):
        sealed_size(-1, CHUNK)


# --- SealReader ----------------------------------------------------------------------------------------


def test_reader_reads_across_chunks_in_any_sizes() -> None:
    data = payload(3 * CHUNK + 17)
    reader = SealReader(io.BytesIO(sealed_blob(data)), key=KEY, context=CONTEXT)
    assert reader.readable() and not reader.writable()
    got = bytearray()
    for size in [1, 4094, 3, CHUNK * 2, 0, 7]:
        part = reader.read(size)
        assert len(part) == size
        got += part
    buffer = bytearray(CHUNK * 4)
    count = reader.readinto(buffer)
    got += buffer[:count]
    assert bytes(got) == data
    assert reader.read(10) == b"" and reader.readinto(buffer) == 0


def test_reader_iterates_lines_across_chunk_boundaries() -> None:
    lines = [f"row {i},{'x' * (i % 300)}\n".encode() for i in range(200)] + [b"no newline at the end"]
    data = b"".join(lines)
    assert len(data) > 3 * CHUNK
    with SealReader(io.BytesIO(sealed_blob(data)), key=KEY, context=CONTEXT) as reader:
        assert list(reader) == lines
    reader = SealReader(io.BytesIO(sealed_blob(data)), key=KEY, context=CONTEXT)
    assert reader.readline(3) == b"row"
    assert reader.readline() == b" 0,\n"
    text = io.TextIOWrapper(
        io.BufferedReader(SealReader(io.BytesIO(sealed_blob(data)), key=KEY, context=CONTEXT))
    )
    assert text.read() == data.decode()


def test_reader_gives_verified_chunks_then_fails_at_the_bad_one_for_good() -> None:
    data = payload(3 * CHUNK)
    tampered = bytearray(sealed_blob(data))
    tampered[segment_start(2) + 5] ^= 0x01
    reader = SealReader(io.BytesIO(bytes(tampered)), key=KEY, context=CONTEXT)
    assert reader.read(2 * CHUNK) == data[: 2 * CHUNK]
    with pytest.raises(SealError) as caught:
        reader.read(1)
    assert caught.value.details == {"chunk": 2}
    with pytest.raises(SealError):
        reader.read(1)
    with pytest.raises(SealError):
        reader.readinto(bytearray(10))


def test_reader_refuses_end_of_input_without_a_last_chunk() -> None:
    data = payload(2 * CHUNK + 3)
    truncated = sealed_blob(data)[: segment_start(2)]
    reader = SealReader(io.BytesIO(truncated), key=KEY, context=CONTEXT)
    assert reader.read(CHUNK) == data[:CHUNK]
    with pytest.raises(SealError) as caught:
        reader.read()
    assert caught.value.code == seal.TRUNCATED


def test_reader_checks_the_header_on_construction_and_refuses_reads_after_close() -> None:
    with pytest.raises(SealError) as caught:
        SealReader(io.BytesIO(b"HMS9" + bytes(40)), key=KEY, context=CONTEXT)
    assert caught.value.code == seal.BAD_MAGIC
    reader = SealReader(io.BytesIO(sealed_blob(b"abc")), key=KEY, context=CONTEXT)
    reader.close()
    with pytest.raises(ValueError, match="closed"):
        reader.read(1)


# --- SealWriter ----------------------------------------------------------------------------------------


def test_writer_refuses_writes_after_close() -> None:
    sink = io.BytesIO()
    writer = SealWriter(sink, key=KEY, context=CONTEXT, chunk_size=CHUNK)
    writer.write(b"abc")
    writer.close()
    writer.close()  # idempotent, writes nothing more
    assert open_bytes(sink.getvalue(), key=KEY, context=CONTEXT) == b"abc"
    with pytest.raises(ValueError, match="closed"):
        writer.write(b"more")


def test_an_exception_in_the_with_block_leaves_an_invalid_blob() -> None:
    sink = io.BytesIO()
    with pytest.raises(RuntimeError), SealWriter(sink, key=KEY, context=CONTEXT, chunk_size=CHUNK) as writer:
        writer.write(payload(2 * CHUNK + 5))
        raise RuntimeError("producer failed")
    assert writer.closed
    assert len(sink.getvalue()) > HEADER_SIZE  # complete chunks went out, the last one did not
    with pytest.raises(SealError) as caught:
        open_bytes(sink.getvalue(), key=KEY, context=CONTEXT)
    assert caught.value.code == seal.TRUNCATED


@pytest.mark.parametrize("size", [10, CHUNK, 3 * CHUNK])
def test_abort_and_garbage_collection_never_finish_a_blob(size: int) -> None:
    aborted, dropped = io.BytesIO(), io.BytesIO()
    writer = SealWriter(aborted, key=KEY, context=CONTEXT, chunk_size=CHUNK)
    writer.write(payload(size))
    writer.abort()
    with pytest.raises(ValueError, match="closed"):
        writer.write(b"x")
    unclosed = SealWriter(dropped, key=KEY, context=CONTEXT, chunk_size=CHUNK)
    unclosed.write(payload(size))
    del unclosed
    gc.collect()
    for sink in (aborted, dropped):
        with pytest.raises(SealError) as caught:
            open_bytes(sink.getvalue(), key=KEY, context=CONTEXT)
        assert caught.value.code == seal.TRUNCATED


def test_a_failing_destination_aborts_the_writer() -> None:
    class Fails(io.RawIOBase):
        def __init__(self) -> None:
            self.data = bytearray()

        def writable(self) -> bool:
            return True

        def write(self, view: memoryview) -> int:  # type: ignore[override]
            if len(self.data) > HEADER_SIZE:
                raise OSError("disk full")
            self.data += view
            return len(view)

    sink = Fails()
    writer = SealWriter(sink, key=KEY, context=CONTEXT, chunk_size=CHUNK)  # type: ignore[arg-type]
    writer.write(payload(CHUNK))
    with pytest.raises(OSError, match="disk full"):
        writer.write(payload(2 * CHUNK))
    assert writer.closed
    writer.close()  # nothing left to finish
    with pytest.raises(SealError):
        open_bytes(bytes(sink.data), key=KEY, context=CONTEXT)


def test_writer_accepts_memoryviews_and_bytearrays() -> None:
    data = payload(CHUNK * 2)
    sink = io.BytesIO()
    with SealWriter(sink, key=KEY, context=CONTEXT, chunk_size=CHUNK) as writer:
        writer.write(memoryview(data)[:CHUNK])
        buffer = bytearray(data[CHUNK:])
        writer.write(buffer)
        buffer[:] = bytes(len(buffer))  # the writer must not keep a reference to the caller's buffer
    assert open_bytes(sink.getvalue(), key=KEY, context=CONTEXT) == data


# --- constant memory and the benchmark ------------------------------------------------------------------


class _GeneratedSource(io.RawIOBase):
    """``size`` pseudo-random bytes made on demand, hashed as they go, never held at once."""

    def __init__(self, size: int):
        self.remaining = size
        self.sha256 = hashlib.sha256()
        self._block = os.urandom(65536)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        count = min(len(buffer), self.remaining, len(self._block))
        buffer[:count] = self._block[:count]
        self._block = self._block[1:] + self._block[:1]  # vary the content from call to call
        self.sha256.update(buffer[:count])
        self.remaining -= count
        return count


class _HashingSink(io.RawIOBase):
    def __init__(self) -> None:
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, view: memoryview) -> int:  # type: ignore[override]
        self.sha256.update(view)
        self.size += len(view)
        return len(view)


@pytest.mark.slow
def test_100_mb_streams_in_constant_memory(tmp_path: Path) -> None:
    size = 100 * 1024 * 1024
    source = _GeneratedSource(size)
    sealed_path = tmp_path / "item.hms1"
    tracemalloc.start()
    try:
        with sealed_path.open("wb") as sealed_file:
            sealing = seal_stream(source, sealed_file, key=KEY, context=CONTEXT)
        with sealed_path.open("rb") as sealed_file:
            sink = _HashingSink()
            opening = open_stream(sealed_file, sink, key=KEY, context=CONTEXT)
        with sealed_path.open("rb") as sealed_file:
            reader_sink = _HashingSink()
            reader = SealReader(sealed_file, key=KEY, context=CONTEXT)
            buffer = bytearray(300_000)
            while count := reader.readinto(buffer):
                reader_sink.write(memoryview(buffer)[:count])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024 * 1024, peak
    assert sealing == opening
    assert sealing.plaintext_size == sink.size == reader_sink.size == size
    assert sealing.plaintext_sha256 == source.sha256.hexdigest() == sink.sha256.hexdigest()
    assert reader_sink.sha256.hexdigest() == sink.sha256.hexdigest()
    assert sealed_path.stat().st_size == sealing.sealed_size == sealed_size(size)


def test_benchmark_script_prints_the_ratio_line() -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tests" / "bench" / "bench_seal.py"),
            "--size-mb",
            "0.25",
            "--repeat",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    last_line = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"seal/raw throughput ratio: \d+\.\d\d", last_line), last_line
