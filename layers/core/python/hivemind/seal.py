"""HMS1: the streaming AEAD that seals room items, agent source, outputs and artifacts (DESIGN §4).

Layout (all integers big-endian)::

    header  = b"HMS1" || version (1 byte, 0x01) || chunk_size (uint32) || salt (16 random bytes)
    key     = HKDF-SHA256(ikm=DEK, salt=salt, info=SealContext.hkdf_info())
    chunk i = AES-256-GCM(key, nonce = i (11 bytes) || last flag (0x01 last, else 0x00),
                          aad = header, plaintext chunk i) -> ciphertext || 16-byte tag

Every chunk but the last holds exactly ``chunk_size`` plaintext bytes; the last holds 1..chunk_size
bytes, or 0 when the whole plaintext is empty, so every stream has a last chunk and a sealed size is a
function of the plaintext size (:func:`sealed_size`). The end of the input marks the last chunk; the
flag in its nonce proves it, so truncation at a chunk boundary, reordering, replayed chunks and appended
data all fail. ``docs/sealing.md`` explains the format and every error.

Opening never hands out a chunk's plaintext before its tag verified. ``AESGCM.decrypt_into`` leaves
unverified plaintext in its output buffer when the tag fails, so it only ever writes into buffers this
module owns, and those are wiped on failure.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Annotated, BinaryIO, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import Field

from hivemind.errors import InvalidInput, SealError
from hivemind.models import ObjectKind, Sha256Hex, StrictModel

MAGIC: Final = b"HMS1"
VERSION: Final = 1
SALT_SIZE: Final = 16
TAG_SIZE: Final = 16
KEY_SIZE: Final = 32
MIN_CHUNK_SIZE: Final = 4 * 1024
MAX_CHUNK_SIZE: Final = 16 * 1024 * 1024
DEFAULT_CHUNK_SIZE: Final = 1024 * 1024
CONTEXT_PREFIX: Final = b"hivemind/v1/hms1|"
# The room part of a library agent's context: it is bound to no room (room ids start with "room_").
LIBRARY_AGENT_ROOM: Final = "none"

_HEADER = struct.Struct(">4sBI16s")
HEADER_SIZE: Final = _HEADER.size  # 25
_COUNTER_BYTES = 11
_LAST = b"\x01"
_NOT_LAST = b"\x00"

# SealError codes, one per way a sealed blob can be refused (stable: clients match on them).
BAD_MAGIC: Final = "seal_bad_magic"
UNSUPPORTED_VERSION: Final = "seal_unsupported_version"
BAD_CHUNK_SIZE: Final = "seal_bad_chunk_size"
TRUNCATED: Final = "seal_truncated"
TAG_MISMATCH: Final = "seal_tag_mismatch"
TRAILING_DATA: Final = "seal_trailing_data"
MALFORMED: Final = "seal_malformed"

# A context field: non-empty, no '|' (the separator, so the info string is unambiguous), no controls.
ContextField = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[^|\x00-\x1f\x7f]+$")]


class SealContext(StrictModel):
    """What a sealed object is and where it belongs; bound into its key so it cannot be moved (§16.14)."""

    tenant_id: ContextField
    room_id: ContextField
    kind: ObjectKind
    object_id: ContextField

    def hkdf_info(self) -> bytes:
        """HKDF ``info``: ``b"hivemind/v1/hms1|" + tenant_id|room_id|kind|object_id`` in UTF-8."""
        fields = (self.tenant_id, self.room_id, self.kind.value, self.object_id)
        return CONTEXT_PREFIX + "|".join(fields).encode("utf-8")


def agent_source_context(tenant_id: str, room_id: str | None, agent_id: str) -> SealContext:
    """The context of a sealed agent's source: its owner, its room (``"none"`` in a library) and itself."""
    return SealContext(
        tenant_id=tenant_id,
        room_id=LIBRARY_AGENT_ROOM if room_id is None else room_id,
        kind=ObjectKind.AGENT_SOURCE,
        object_id=agent_id,
    )


class SealStats(StrictModel):
    """Sizes and SHA-256 digests of both sides of one sealed stream.

    The control plane records ``sealed_size`` and ``sealed_sha256`` (it checks the uploaded object
    against them); receipts record both digests.
    """

    plaintext_size: int = Field(ge=0)
    plaintext_sha256: Sha256Hex
    sealed_size: int = Field(ge=0)
    sealed_sha256: Sha256Hex
    chunk_size: int = Field(ge=MIN_CHUNK_SIZE, le=MAX_CHUNK_SIZE)


def sealed_size(plaintext_size: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> int:
    """Exact size of the HMS1 blob for ``plaintext_size`` bytes (for presigned upload size checks)."""
    _check_chunk_size(chunk_size)
    if isinstance(plaintext_size, bool) or not isinstance(plaintext_size, int) or plaintext_size < 0:
        raise InvalidInput("plaintext size must be a non-negative integer")
    chunks = max(1, -(-plaintext_size // chunk_size))
    return HEADER_SIZE + plaintext_size + chunks * TAG_SIZE


# --- shared checks and helpers -------------------------------------------------------------------


def _check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise InvalidInput("chunk size must be an integer")
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise InvalidInput(f"chunk size must be between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE} bytes")


def _derive_aead(key: bytes, salt: bytes, context: SealContext) -> AESGCM:
    if not isinstance(key, bytes | bytearray) or len(key) != KEY_SIZE:
        raise InvalidInput(f"an HMS1 key (room DEK or output key) is {KEY_SIZE} bytes")
    if not isinstance(context, SealContext):
        raise InvalidInput("context must be a SealContext")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=salt, info=context.hkdf_info())
    return AESGCM(hkdf.derive(bytes(key)))


def _nonce(index: int, last: bool) -> bytes:
    return index.to_bytes(_COUNTER_BYTES, "big") + (_LAST if last else _NOT_LAST)


def _wipe(buffer: bytearray | memoryview) -> None:
    """Best-effort zeroing of plaintext this module held (Python may keep other copies)."""
    buffer[:] = bytes(len(buffer))


ReadInto = Callable[[memoryview], int]
BytesLike = bytes | bytearray | memoryview


def _readinto_of(src: BinaryIO) -> ReadInto:
    """``src.readinto`` when the source has it (files, BytesIO, botocore bodies), else a ``read`` shim."""
    readinto = getattr(src, "readinto", None)
    if readinto is not None:
        return readinto

    def read_into(view: memoryview) -> int:
        data = src.read(len(view))
        view[: len(data)] = data
        return len(data)

    return read_into


def _read_full(readinto: ReadInto, view: memoryview) -> int:
    """Fill ``view`` unless the source ends first; a short count means end of input."""
    filled = 0
    while filled < len(view):
        count = readinto(view[filled:])
        if not count:  # 0 at end of input; None from a non-blocking source that has nothing yet
            if count is None:
                raise BlockingIOError("HMS1 needs a blocking source")
            break
        filled += count
    return filled


def _write_all(dst: BinaryIO, view: memoryview) -> None:
    written = dst.write(view)
    # Raw streams may write less; a None return (duck-typed sinks) means all, as in shutil.copyfileobj.
    while written is not None and written < len(view):
        if written <= 0:
            raise OSError("the destination stopped accepting bytes")
        view = view[written:]
        written = dst.write(view)


# --- sealing -------------------------------------------------------------------------------------


class _ChunkSealer:
    """Header, key and chunk counter of one stream being sealed. Owns no plaintext."""

    def __init__(self, key: bytes, context: SealContext, chunk_size: int):
        _check_chunk_size(chunk_size)
        salt = os.urandom(SALT_SIZE)
        self.chunk_size = chunk_size
        self.header = _HEADER.pack(MAGIC, VERSION, chunk_size, salt)
        self._aead = _derive_aead(key, salt, context)
        self._index = 0

    def seal_into(self, plaintext: memoryview, last: bool, out: memoryview) -> None:
        """Encrypt the next chunk into ``out`` (exactly ``len(plaintext) + TAG_SIZE`` bytes)."""
        self._aead.encrypt_into(_nonce(self._index, last), plaintext, self.header, out)
        self._index += 1

    def take_back(self, sealed: memoryview, plaintext_out: memoryview) -> None:
        """Undo the latest ``seal_into`` of a not-last chunk that was never written: recover its
        plaintext and rewind the counter, so the chunk can be sealed again as the last one (the
        nonce differs in its last flag, so no nonce is used twice)."""
        self._index -= 1
        self._aead.decrypt_into(_nonce(self._index, False), sealed, self.header, plaintext_out)


def seal_bytes(
    data: BytesLike, *, key: bytes, context: SealContext, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> bytes:
    """Seal an in-memory plaintext; the result is what :func:`seal_stream` would write."""
    sealer = _ChunkSealer(key, context, chunk_size)
    plaintext = memoryview(data).cast("B")
    out = bytearray(sealed_size(len(plaintext), chunk_size))
    out[:HEADER_SIZE] = sealer.header
    out_view = memoryview(out)
    offset = HEADER_SIZE
    # range() yields nothing for an empty plaintext, which still gets its one (empty) last chunk.
    starts = range(0, len(plaintext), chunk_size) or range(1)
    for start in starts:
        piece = plaintext[start : start + chunk_size]
        end = offset + len(piece) + TAG_SIZE
        sealer.seal_into(piece, start + chunk_size >= len(plaintext), out_view[offset:end])
        offset = end
    return bytes(out)


def seal_stream(
    src: BinaryIO,
    dst: BinaryIO,
    *,
    key: bytes,
    context: SealContext,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> SealStats:
    """Seal everything ``src`` yields into ``dst`` in constant memory (three chunk-sized buffers).

    Returns sizes and SHA-256 digests of the plaintext read and of the sealed bytes written. Neither
    stream is closed. If this raises, ``dst`` holds an invalid (unfinished) blob: discard it.
    """
    sealer = _ChunkSealer(key, context, chunk_size)
    readinto = _readinto_of(src)
    plaintext_hash, sealed_hash = hashlib.sha256(), hashlib.sha256()
    sealed_hash.update(sealer.header)
    _write_all(dst, memoryview(sealer.header))
    # Two plaintext buffers: the next chunk is read before the current one is sealed, because only
    # the end of input says which chunk is the last.
    current, following = bytearray(chunk_size), bytearray(chunk_size)
    sealed = memoryview(bytearray(chunk_size + TAG_SIZE))
    plaintext_size = 0
    try:
        current_len = _read_full(readinto, memoryview(current))
        while True:
            following_len = _read_full(readinto, memoryview(following)) if current_len == chunk_size else 0
            last = following_len == 0
            plaintext = memoryview(current)[:current_len]
            plaintext_hash.update(plaintext)
            out = sealed[: current_len + TAG_SIZE]
            sealer.seal_into(plaintext, last, out)
            sealed_hash.update(out)
            _write_all(dst, out)
            plaintext_size += current_len
            if last:
                break
            current, following, current_len = following, current, following_len
    finally:
        _wipe(current)
        _wipe(following)
    return SealStats(
        plaintext_size=plaintext_size,
        plaintext_sha256=plaintext_hash.hexdigest(),
        sealed_size=sealed_size(plaintext_size, chunk_size),
        sealed_sha256=sealed_hash.hexdigest(),
        chunk_size=chunk_size,
    )


class SealWriter(io.RawIOBase):
    """A writable file that seals what is written to it into ``dst``.

    Only a successful :meth:`close` (or leaving a ``with`` block without an exception) writes the last
    chunk. Leaving the block through an exception, :meth:`abort`, a failed write to ``dst`` or garbage
    collection of an unclosed writer all leave ``dst`` without a last chunk, so the partial blob never
    opens. ``dst`` is not closed. Not thread-safe.
    """

    def __init__(
        self,
        dst: BinaryIO,
        *,
        key: bytes,
        context: SealContext,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ):
        super().__init__()
        try:
            self._sealer = _ChunkSealer(key, context, chunk_size)
        except BaseException:
            super().close()  # a writer that never started is closed, so finalizing it does nothing
            raise
        self._dst = dst
        self._chunk_size = chunk_size
        self._pending = bytearray(chunk_size)  # plaintext not yet sealed
        self._pending_len = 0
        self._sealed = memoryview(bytearray(chunk_size + TAG_SIZE))
        # True while self._sealed holds a full chunk sealed as not-last but not yet written; never
        # at the same time as pending plaintext.
        self._held = False
        self._run_or_abort(_write_all, dst, memoryview(self._sealer.header))

    def writable(self) -> bool:
        return True

    def write(self, data: BytesLike) -> int:
        if self.closed:
            raise ValueError("write to a closed SealWriter")
        view = memoryview(data).cast("B")
        size = len(view)
        self._run_or_abort(self._absorb, view)
        return size

    def close(self) -> None:
        """Seal the buffered plaintext as the last chunk; the blob in ``dst`` is complete afterwards."""
        if self.closed:
            return
        self._run_or_abort(self._finish)
        self._discard()

    def abort(self) -> None:
        """Close without writing the last chunk: whatever reached ``dst`` will never open."""
        self._discard()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:
        # io.IOBase finalizes with close(), which would seal a truncated stream as complete.
        if not self.closed:
            self.abort()

    def _absorb(self, view: memoryview) -> None:
        size = self._chunk_size
        while view:
            if self._pending_len == size:  # more data follows a full pending chunk: it is not the last
                self._seal_pending(False)
            self._release_held()  # more data follows the held chunk: it is not the last
            if self._pending_len == 0 and len(view) >= size:
                # Seal a full chunk straight from the caller's buffer (no copy) as not-last, and hold
                # it back: if nothing else is written, close() reseals it as the last chunk.
                self._sealer.seal_into(view[:size], False, self._sealed)
                self._held = True
                view = view[size:]
                continue
            take = min(size - self._pending_len, len(view))
            self._pending[self._pending_len : self._pending_len + take] = view[:take]
            self._pending_len += take
            view = view[take:]

    def _finish(self) -> None:
        if self._held:
            self._sealer.take_back(self._sealed, memoryview(self._pending))
            self._held = False
            self._pending_len = self._chunk_size
        self._seal_pending(True)

    def _release_held(self) -> None:
        if self._held:
            self._held = False
            _write_all(self._dst, self._sealed)

    def _seal_pending(self, last: bool) -> None:
        out = self._sealed[: self._pending_len + TAG_SIZE]
        self._sealer.seal_into(memoryview(self._pending)[: self._pending_len], last, out)
        self._pending_len = 0
        _write_all(self._dst, out)

    def _run_or_abort(self, step: Callable[..., None], *args: object) -> None:
        try:
            step(*args)
        except BaseException:
            self._discard()
            raise

    def _discard(self) -> None:
        _wipe(self._pending)
        self._pending_len = 0
        self._held = False
        super().close()


# --- opening -------------------------------------------------------------------------------------


def _parse_header(header: bytes) -> tuple[int, bytes]:
    if len(header) >= len(MAGIC) and header[: len(MAGIC)] != MAGIC:
        raise SealError("not an HMS1 sealed blob (bad magic)", code=BAD_MAGIC)
    if len(header) < HEADER_SIZE:
        raise SealError(
            f"sealed blob ends inside its header ({len(header)} of {HEADER_SIZE} bytes): truncated",
            code=TRUNCATED,
        )
    _, version, chunk_size, salt = _HEADER.unpack(header)
    if version != VERSION:
        raise SealError(
            f"unsupported HMS1 version {version} (this library reads version {VERSION})",
            code=UNSUPPORTED_VERSION,
        )
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise SealError(
            f"header declares chunk size {chunk_size}, outside {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}",
            code=BAD_CHUNK_SIZE,
        )
    return chunk_size, salt


def _open_segment(
    aead: AESGCM, header: bytes, segment: memoryview, *, index: int, last: bool, out: memoryview
) -> None:
    """Verify and decrypt one chunk into ``out``, or wipe ``out`` and raise the precise SealError."""
    if len(segment) < TAG_SIZE:
        raise SealError(
            f"sealed blob ends inside chunk {index}: truncated", code=TRUNCATED, details={"chunk": index}
        )
    try:
        aead.decrypt_into(_nonce(index, last), segment, header, out)
        return
    except InvalidTag:
        _wipe(out)
    # Diagnosis only: does the chunk verify with the other last-chunk flag? Its plaintext is dropped.
    try:
        aead.decrypt(_nonce(index, not last), segment, header)
    except InvalidTag:
        raise SealError(
            f"chunk {index} failed authentication: tampered, reordered, cut mid-chunk, "
            "or the wrong key or context",
            code=TAG_MISMATCH,
            details={"chunk": index},
        ) from None
    if last:
        raise SealError(
            f"sealed blob ends after chunk {index}, which is not the last chunk: truncated",
            code=TRUNCATED,
            details={"chunk": index},
        )
    raise SealError(
        f"chunk {index} is the last chunk but more bytes follow it: trailing data",
        code=TRAILING_DATA,
        details={"chunk": index},
    )


def open_bytes(blob: BytesLike, *, key: bytes, context: SealContext) -> bytes:
    """Open an in-memory HMS1 blob; any defect raises :class:`SealError` and returns nothing."""
    sealed = memoryview(blob).cast("B")
    header = bytes(sealed[:HEADER_SIZE])
    chunk_size, salt = _parse_header(header)
    aead = _derive_aead(key, salt, context)
    body = sealed[HEADER_SIZE:]
    if not body:
        raise _no_chunks()
    segment_size = chunk_size + TAG_SIZE
    starts = range(0, len(body), segment_size)
    # Every segment but the last is full; a last one shorter than a tag is refused before it is used.
    out = bytearray((len(starts) - 1) * chunk_size + max(0, len(body) - starts[-1] - TAG_SIZE))
    out_view = memoryview(out)
    try:
        for index, start in enumerate(starts):
            segment = body[start : start + segment_size]
            offset = index * chunk_size
            plaintext_len = max(0, len(segment) - TAG_SIZE)
            last = start + segment_size >= len(body)
            chunk_out = out_view[offset : offset + plaintext_len]
            _open_segment(aead, header, segment, index=index, last=last, out=chunk_out)
            if last and index > 0 and plaintext_len == 0:
                raise _empty_last_chunk(index)
    except SealError:
        _wipe(out)
        raise
    return bytes(out)


def _no_chunks() -> SealError:
    return SealError("sealed blob ends after its header: no chunks, truncated", code=TRUNCATED)


def _empty_last_chunk(index: int) -> SealError:
    return SealError(
        f"chunk {index} is an empty last chunk after data; HMS1 writers never produce one",
        code=MALFORMED,
        details={"chunk": index},
    )


class _ChunkOpener:
    """Reads and verifies one sealed stream chunk by chunk, with one chunk of lookahead."""

    def __init__(self, readinto: ReadInto, key: bytes, context: SealContext):
        header = bytearray(HEADER_SIZE)
        header_len = _read_full(readinto, memoryview(header))
        self.chunk_size, salt = _parse_header(bytes(header[:header_len]))
        self.header = bytes(header)
        self._aead = _derive_aead(key, salt, context)
        self._readinto = readinto
        self._current = bytearray(self.chunk_size + TAG_SIZE)
        self._following = bytearray(self.chunk_size + TAG_SIZE)
        self._current_len: int | None = None  # None until the first chunk is read
        self.plaintext = bytearray(self.chunk_size)
        self._index = 0
        self.finished = False

    def next_chunk(self) -> int | None:
        """Verify the next chunk; its plaintext is ``self.plaintext[:n]``. None after the last chunk."""
        if self.finished:
            return None
        segment_size = self.chunk_size + TAG_SIZE
        if self._current_len is None:
            self._current_len = _read_full(self._readinto, memoryview(self._current))
            if self._current_len == 0:
                raise _no_chunks()
        current_len = self._current_len
        # A full segment is the last one only if nothing follows it.
        following_len = (
            _read_full(self._readinto, memoryview(self._following)) if current_len == segment_size else 0
        )
        last = following_len == 0
        plaintext_len = max(0, current_len - TAG_SIZE)
        out = memoryview(self.plaintext)[:plaintext_len]
        segment = memoryview(self._current)[:current_len]
        _open_segment(self._aead, self.header, segment, index=self._index, last=last, out=out)
        if last and self._index > 0 and plaintext_len == 0:
            raise _empty_last_chunk(self._index)
        self._current, self._following, self._current_len = self._following, self._current, following_len
        self._index += 1
        self.finished = last
        return plaintext_len

    def wipe(self) -> None:
        _wipe(self.plaintext)


def open_stream(src: BinaryIO, dst: BinaryIO, *, key: bytes, context: SealContext) -> SealStats:
    """Open the HMS1 stream in ``src`` into ``dst`` in constant memory; return sizes and digests.

    Each chunk reaches ``dst`` only after its tag verified. A later chunk can still fail, so treat
    everything written to ``dst`` as untrusted until this returns: on SealError, discard ``dst``.
    Neither stream is closed.
    """
    sealed_hash, plaintext_hash = hashlib.sha256(), hashlib.sha256()
    source_readinto = _readinto_of(src)

    def hashed_readinto(view: memoryview) -> int:
        count = source_readinto(view)
        if count:
            sealed_hash.update(view[:count])
        return count

    opener = _ChunkOpener(hashed_readinto, key, context)
    plaintext_size = 0
    try:
        while (plaintext_len := opener.next_chunk()) is not None:
            plaintext = memoryview(opener.plaintext)[:plaintext_len]
            plaintext_hash.update(plaintext)
            _write_all(dst, plaintext)
            plaintext_size += plaintext_len
    finally:
        opener.wipe()
    return SealStats(
        plaintext_size=plaintext_size,
        plaintext_sha256=plaintext_hash.hexdigest(),
        sealed_size=sealed_size(plaintext_size, opener.chunk_size),
        sealed_sha256=sealed_hash.hexdigest(),
        chunk_size=opener.chunk_size,
    )


class SealReader(io.RawIOBase):
    """A readable file over an HMS1 stream that verifies and decrypts one chunk at a time.

    The header is read and checked on construction. Reads return only verified plaintext, but a later
    chunk may still fail: the stream is trustworthy as a whole only once a read has returned end of
    file (``b""``). A failure raises :class:`SealError` at the failing chunk, and every later read
    raises it again. ``src`` is not closed. Not thread-safe.
    """

    def __init__(self, src: BinaryIO, *, key: bytes, context: SealContext):
        super().__init__()
        try:
            self._opener = _ChunkOpener(_readinto_of(src), key, context)
        except BaseException:
            super().close()  # a reader whose header failed is closed, so finalizing it does nothing
            raise
        self._position = 0  # next unread byte of the current chunk in self._opener.plaintext
        self._end = 0
        self._failure: BaseException | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:
        out = memoryview(buffer).cast("B")
        filled = 0
        for piece in self._pieces(len(out)):
            out[filled : filled + len(piece)] = piece
            filled += len(piece)
        return filled

    def read(self, size: int | None = -1) -> bytes:
        """Up to ``size`` bytes (all remaining if negative); fewer only at end of file."""
        limit = None if size is None or size < 0 else size
        out = bytearray()
        for piece in self._pieces(limit):
            out += piece
        return bytes(out)

    def readall(self) -> bytes:
        return self.read(-1)

    def readline(self, size: int | None = -1) -> bytes:
        limit = None if size is None or size < 0 else size
        out = bytearray()
        while (limit is None or len(out) < limit) and self._fill():
            end = self._end if limit is None else min(self._end, self._position + limit - len(out))
            newline = self._opener.plaintext.find(b"\n", self._position, end)
            stop = end if newline < 0 else newline + 1
            out += memoryview(self._opener.plaintext)[self._position : stop]
            self._position = stop
            if newline >= 0:
                break
        return bytes(out)

    def close(self) -> None:
        if not self.closed:
            self._opener.wipe()
        super().close()

    def _pieces(self, limit: int | None) -> Iterator[memoryview]:
        """Views of verified plaintext, in order, up to ``limit`` bytes; each is valid until the next."""
        if self.closed:
            raise ValueError("read from a closed SealReader")
        remaining = limit
        while (remaining is None or remaining > 0) and self._fill():
            available = self._end - self._position
            take = available if remaining is None else min(remaining, available)
            yield memoryview(self._opener.plaintext)[self._position : self._position + take]
            self._position += take
            if remaining is not None:
                remaining -= take

    def _fill(self) -> bool:
        """Make unread verified plaintext available; False at the verified end of the stream."""
        if self.closed:
            raise ValueError("read from a closed SealReader")
        if self._failure is not None:
            raise self._failure
        while self._position == self._end:
            try:
                plaintext_len = self._opener.next_chunk()
            except BaseException as exc:
                # Fail closed for good: no read after a failure may return data.
                self._failure = exc
                self._opener.wipe()
                raise
            if plaintext_len is None:
                return False
            self._position, self._end = 0, plaintext_len
        return True
