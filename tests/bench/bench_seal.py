"""Throughput of HMS1 sealing against raw AES-256-GCM over the same bytes (DESIGN §4).

Run as a script: ``python tests/bench/bench_seal.py [--size-mb 256] [--repeat 5]``.

Every workload reads its input from an in-memory source with ``readinto`` into a chunk-sized buffer
and writes to a sink that discards, so neither disk nor allocation of the result is measured:

- ``raw``: AES-256-GCM per chunk (counter nonce, the header as AAD), encrypt then decrypt;
- ``hms1``: the same bytes through :class:`SealWriter` and :class:`SealReader` (the headline);
- ``hms1+sha256``: :func:`seal_stream` and :func:`open_stream`, which also hash the plaintext and the
  sealed bytes (the digests the control plane and receipts record); one SHA-256 pass over the same
  bytes is timed too, to show where that time goes.

Each repeat runs every workload once, interleaved; throughput is plaintext MiB / (encrypt + decrypt
seconds). The last line is the median over repeats of the per-repeat ``hms1 / raw`` ratio.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import BinaryIO

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from hivemind.models import ObjectKind
from hivemind.seal import (
    DEFAULT_CHUNK_SIZE,
    HEADER_SIZE,
    TAG_SIZE,
    SealContext,
    SealReader,
    SealWriter,
    open_bytes,
    open_stream,
    seal_bytes,
    seal_stream,
)

MIB = 1024 * 1024
CONTEXT = SealContext(
    tenant_id="tenant_bench", room_id="room_bench", kind=ObjectKind.ITEM, object_id="item_1"
)


class NullSink(io.RawIOBase):
    """A write-only sink that keeps nothing, like /dev/null without the system call."""

    def writable(self) -> bool:
        return True

    def write(self, data: memoryview) -> int:  # type: ignore[override]
        return len(data)


def _nonce(index: int) -> bytes:
    return index.to_bytes(11, "big") + b"\x00"


def raw_encrypt(key: bytes, data: bytes, chunk_size: int) -> None:
    aead, src, sink = AESGCM(key), io.BytesIO(data), NullSink()
    plain = memoryview(bytearray(chunk_size))
    sealed = memoryview(bytearray(chunk_size + TAG_SIZE))
    aad = bytes(HEADER_SIZE)
    index = 0
    while count := src.readinto(plain):
        out = sealed[: count + TAG_SIZE]
        aead.encrypt_into(_nonce(index), plain[:count], aad, out)
        sink.write(out)
        index += 1


def raw_decrypt(key: bytes, ciphertext: bytes, chunk_size: int) -> None:
    aead, src, sink = AESGCM(key), io.BytesIO(ciphertext), NullSink()
    segment = memoryview(bytearray(chunk_size + TAG_SIZE))
    plain = memoryview(bytearray(chunk_size))
    aad = bytes(HEADER_SIZE)
    index = 0
    while count := src.readinto(segment):
        out = plain[: count - TAG_SIZE]
        aead.decrypt_into(_nonce(index), segment[:count], aad, out)
        sink.write(out)
        index += 1


def raw_ciphertext(key: bytes, data: bytes, chunk_size: int) -> bytes:
    aead, aad = AESGCM(key), bytes(HEADER_SIZE)
    starts = range(0, len(data), chunk_size)
    return b"".join(aead.encrypt(_nonce(i), data[s : s + chunk_size], aad) for i, s in enumerate(starts))


def hms1_encrypt(key: bytes, data: bytes, chunk_size: int, sink: BinaryIO | None = None) -> None:
    src = io.BytesIO(data)
    plain = memoryview(bytearray(chunk_size))
    with SealWriter(sink or NullSink(), key=key, context=CONTEXT, chunk_size=chunk_size) as writer:
        while count := src.readinto(plain):
            writer.write(plain[:count])


def hms1_decrypt(key: bytes, sealed: bytes, chunk_size: int) -> None:
    reader = SealReader(io.BytesIO(sealed), key=key, context=CONTEXT)
    sink = NullSink()
    plain = memoryview(bytearray(chunk_size))
    while count := reader.readinto(plain):
        sink.write(plain[:count])


def stream_encrypt(key: bytes, data: bytes, chunk_size: int) -> None:
    seal_stream(io.BytesIO(data), NullSink(), key=key, context=CONTEXT, chunk_size=chunk_size)


def stream_decrypt(key: bytes, sealed: bytes, chunk_size: int) -> None:
    open_stream(io.BytesIO(sealed), NullSink(), key=key, context=CONTEXT)


def timed(run: Callable[[], None]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def summary(name: str, size_mb: float, encrypt_s: list[float], decrypt_s: list[float]) -> list[float]:
    """Print min/median/max round-trip MB/s and return the per-repeat round-trip throughputs."""
    round_trip = [size_mb / (e + d) for e, d in zip(encrypt_s, decrypt_s, strict=True)]
    print(
        f"{name:12s} encrypt+decrypt MiB/s  min {min(round_trip):8.0f}  median "
        f"{statistics.median(round_trip):8.0f}  max {max(round_trip):8.0f}   "
        f"(median encrypt {size_mb / statistics.median(encrypt_s):.0f}, "
        f"decrypt {size_mb / statistics.median(decrypt_s):.0f})"
    )
    return round_trip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=256, help="plaintext size in MiB (default 256)")
    parser.add_argument("--repeat", type=int, default=5, help="repeats of every workload (default 5)")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="bytes per chunk")
    args = parser.parse_args(argv)
    if args.size_mb <= 0 or args.repeat < 1:
        parser.error("--size-mb must be positive and --repeat at least 1")

    size = int(args.size_mb * MIB)
    size_mb = size / MIB
    chunk_size = args.chunk_size
    key = os.urandom(32)
    data = os.urandom(size)
    raw_sealed = raw_ciphertext(key, data, chunk_size)
    hms1_sealed = seal_bytes(data, key=key, context=CONTEXT, chunk_size=chunk_size)

    # Untimed check that the measured writer produces a blob that opens to the input.
    captured = io.BytesIO()
    hms1_encrypt(key, data, chunk_size, captured)
    if hashlib.sha256(open_bytes(captured.getvalue(), key=key, context=CONTEXT)).digest() != (
        hashlib.sha256(data).digest()
    ):
        print("SealWriter output does not open to its input", file=sys.stderr)
        return 1
    del captured

    workloads = {
        "raw": (lambda: raw_encrypt(key, data, chunk_size), lambda: raw_decrypt(key, raw_sealed, chunk_size)),
        "hms1": (
            lambda: hms1_encrypt(key, data, chunk_size),
            lambda: hms1_decrypt(key, hms1_sealed, chunk_size),
        ),
        "hms1+sha256": (
            lambda: stream_encrypt(key, data, chunk_size),
            lambda: stream_decrypt(key, hms1_sealed, chunk_size),
        ),
    }
    encrypt_s: dict[str, list[float]] = {name: [] for name in workloads}
    decrypt_s: dict[str, list[float]] = {name: [] for name in workloads}
    sha256_s: list[float] = []
    for _ in range(args.repeat):
        for name, (encrypt, decrypt) in workloads.items():
            encrypt_s[name].append(timed(encrypt))
            decrypt_s[name].append(timed(decrypt))
        sha256_s.append(timed(lambda: hashlib.sha256(data)))

    print(
        f"HMS1 vs raw AES-256-GCM: {size_mb:g} MiB, chunk {chunk_size} bytes, {args.repeat} repeats, "
        f"{os.cpu_count()} CPUs"
    )
    throughput = {name: summary(name, size_mb, encrypt_s[name], decrypt_s[name]) for name in workloads}
    print(f"{'sha256':12s} one pass MiB/s median {size_mb / statistics.median(sha256_s):8.0f}")
    with_digests = [s / r for s, r in zip(throughput["hms1+sha256"], throughput["raw"], strict=True)]
    print(f"hms1+sha256/raw throughput ratio: {statistics.median(with_digests):.2f}")
    ratio = [s / r for s, r in zip(throughput["hms1"], throughput["raw"], strict=True)]
    print(f"seal/raw throughput ratio: {statistics.median(ratio):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
