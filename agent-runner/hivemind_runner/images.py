"""The pipeline's agent image cache: one prepared agent per source digest (DESIGN §8, §7 step 4).

The backend already caches on disk or in the engine (``prepare`` of a known digest is one lookup);
this cache adds what a long-lived runner needs on top: a prepared agent per digest in memory, at most
one ``prepare`` per digest at a time across threads, and a way to start from the stored archive.

The image digest each :class:`PreparedAgent` carries goes into the receipt next to the source digest:

- Docker backend: the image ID (``sha256:...`` of the image config) built from the agent's source on
  the allowed base image;
- process backend: ``"sha256:" + sha256(JCS({"backend": "process", "rootfs_tar_sha256",
  "sdk_sha256", "source_digest"}))``, a content address of everything the agent runs on.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO

from hivemind.archive import DEFAULT_LIMITS, ArchiveLimits, extract_archive
from hivemind_runner.sandbox.base import PreparedAgent, SandboxBackend, SourceDigestMismatch


class AgentImageCache:
    """Prepared agents by source digest for one backend. Thread-safe."""

    def __init__(self, backend: SandboxBackend):
        self.backend = backend
        self._prepared: dict[str, PreparedAgent] = {}
        self._lock = threading.Lock()
        self._digest_locks: dict[str, threading.Lock] = {}

    def _digest_lock(self, source_digest: str) -> threading.Lock:
        with self._lock:
            return self._digest_locks.setdefault(source_digest, threading.Lock())

    def cached(self, source_digest: str) -> PreparedAgent | None:
        with self._lock:
            return self._prepared.get(source_digest)

    def get(self, source_dir: Path, source_digest: str) -> PreparedAgent:
        """The prepared agent for ``source_dir``, which must hold exactly the source ``source_digest``.

        The backend checks the directory against the digest before it builds; a cached digest skips
        that (the image was built from checked source).
        """
        with self._digest_lock(source_digest):
            prepared = self.cached(source_digest)
            if prepared is None:
                prepared = self.backend.prepare(source_dir, source_digest)
                with self._lock:
                    self._prepared[source_digest] = prepared
            return prepared

    def get_from_archive(
        self,
        archive: bytes | str | os.PathLike[str] | BinaryIO,
        source_digest: str,
        *,
        work_dir: Path,
        limits: ArchiveLimits = DEFAULT_LIMITS,
    ) -> PreparedAgent:
        """Like :meth:`get`, from the agent's stored ``.tar.gz``: validated and extracted into a
        temporary directory under ``work_dir`` (keep it on tmpfs for sealed sources), then removed."""
        with self._digest_lock(source_digest):
            prepared = self.cached(source_digest)
            if prepared is not None:
                return prepared
            scratch = Path(tempfile.mkdtemp(prefix="agent-source-", dir=work_dir))
            try:
                manifest = extract_archive(archive, scratch / "source", limits)
                if manifest.digest != source_digest:
                    raise SourceDigestMismatch(
                        f"the stored agent archive has digest {manifest.digest}, "
                        f"the room pins {source_digest}"
                    )
                prepared = self.backend.prepare(scratch / "source", source_digest)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            with self._lock:
                self._prepared[source_digest] = prepared
            return prepared

    def forget(self, source_digest: str) -> None:
        """Drop a digest, e.g. after ``run`` reported its image gone; the next ``get`` prepares again."""
        with self._lock:
            self._prepared.pop(source_digest, None)
