"""Agent archives: validation, deterministic packing, source digests and safe extraction (DESIGN §8).

An agent is a directory, shipped as a gzip-compressed tar archive, with a ``Dockerfile`` at its root. The
control plane validates an uploaded archive on commit, and the runner validates it again while it
extracts it: neither trusts the other.

Every archive is read as a stream through :mod:`tarfile`, behind a budget on decompressed bytes and on
the compression ratio, so a gzip bomb or a huge tar header is refused after at most the configured
number of bytes. Only regular files and directories are accepted; each refusal is an
:class:`~hivemind.errors.InvalidArchive` whose message names the member.

The **source digest** that room manifests pin covers the files, not the archive bytes::

    sha256( JCS( [ {"path", "sha256", "size", "executable"}, ... sorted by path ] ) )   (lowercase hex)

so the same files give the same digest whatever tool packed them, in whatever order, with whatever
mtimes, owners or directory entries. Directories are implied by the file paths: an empty directory is
not part of an agent and is not extracted.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import stat
import tarfile
import unicodedata
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Self

from pydantic import Field, model_validator

from hivemind.canonical import canonical_sha256
from hivemind.errors import InvalidArchive, NotFound
from hivemind.models import Sha256Hex, StrictModel

DOCKERFILE = "Dockerfile"

_MIB = 1024 * 1024
_CHUNK = 64 * 1024
# The ratio check starts once this much was decompressed: tiny archives are mostly tar padding, which
# compresses extremely well, and cannot hurt anyone.
_RATIO_FLOOR_BYTES = 1 * _MIB
# Tar overhead allowed per member on top of the file bytes: a header block, a PAX header block with a
# long path record, and padding. Bounds what headers can make the reader decompress.
_HEADER_ALLOWANCE_BYTES = 4096
_MAX_COMPONENT_BYTES = 255
# Unicode categories refused in names: controls, format characters (bidi overrides, zero-width),
# surrogates (undecodable bytes), private use, unassigned, line and paragraph separators.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
# Bounds for manifests read back from storage, whatever limits the archive was checked with.
_ABSOLUTE_MAX_PATH_BYTES = 4096
_ABSOLUTE_MAX_DEPTH = 256


class ArchiveLimits(StrictModel):
    """Bounds on an agent archive. Every one is checked against declared sizes and bytes actually read."""

    max_files: int = Field(default=1000, ge=1, le=100_000, description="regular files; directories too")
    max_file_bytes: int = Field(default=50 * _MIB, ge=0, description="uncompressed size of one file")
    max_total_bytes: int = Field(default=50 * _MIB, ge=0, description="uncompressed size of all files")
    max_ratio: int = Field(default=200, ge=2, description="decompressed bytes per compressed byte")
    max_path_bytes: int = Field(
        default=512, ge=16, le=_ABSOLUTE_MAX_PATH_BYTES, description="UTF-8 length of a path"
    )
    max_depth: int = Field(default=32, ge=1, le=_ABSOLUTE_MAX_DEPTH, description="path components")

    @property
    def max_stream_bytes(self) -> int:
        """Decompressed tar bytes the reader accepts: the files plus header overhead for every entry."""
        return self.max_total_bytes + (2 * self.max_files + 2) * _HEADER_ALLOWANCE_BYTES


DEFAULT_LIMITS = ArchiveLimits()


class AgentFile(StrictModel):
    """One regular file of an agent. ``path`` is relative, ``/``-separated, already validated."""

    path: str = Field(min_length=1, max_length=4096)
    sha256: Sha256Hex
    size: int = Field(ge=0)
    executable: bool


class AgentManifest(StrictModel):
    """The files of an agent, sorted by path, with their hashes: what the source digest covers.

    The API serves inspectable files from it; the runner checks the source it builds against it.
    """

    files: tuple[AgentFile, ...]

    @model_validator(mode="after")
    def _check_files(self) -> Self:
        paths = [entry.path for entry in self.files]
        for path in paths:
            _checked_path(path, _ABSOLUTE_MAX_PATH_BYTES, _ABSOLUTE_MAX_DEPTH)
        if paths != sorted(paths) or len(set(paths)) != len(paths):
            raise ValueError("files must be sorted by path and unique")
        if DOCKERFILE not in paths:
            raise ValueError("an agent has a Dockerfile at its root")
        return self

    @property
    def total_size(self) -> int:
        return sum(entry.size for entry in self.files)

    @property
    def digest(self) -> str:
        return source_digest(self)

    def file(self, path: str) -> AgentFile:
        for entry in self.files:
            if entry.path == path:
                return entry
        raise NotFound(f"the agent has no file {path!r}")

    def file_digests(self) -> dict[str, str]:
        """``{path: sha256}``, the form the Agents table stores."""
        return {entry.path: entry.sha256 for entry in self.files}


def source_digest(manifest: AgentManifest) -> str:
    """Lowercase hex SHA-256 of the JCS of the sorted file list: the digest room manifests pin."""
    return canonical_sha256([entry.model_dump(mode="json") for entry in manifest.files])


# --- names -----------------------------------------------------------------------------------------


def _checked_path(name: str, max_path_bytes: int, max_depth: int) -> str:
    """Return ``name`` if it is a safe relative path; raise InvalidArchive naming it otherwise."""
    shown = ascii(name)
    if not name:
        raise InvalidArchive("a member has an empty name")
    if name.startswith("/"):
        raise InvalidArchive(f"{shown}: absolute paths are not allowed")
    for char in name:
        if char == "\\":
            raise InvalidArchive(f"{shown}: backslashes are not allowed in names")
        category = unicodedata.category(char)
        if category == "Cs":
            raise InvalidArchive(f"{shown}: the name is not valid UTF-8")
        if category in _REFUSED_CATEGORIES:
            raise InvalidArchive(f"{shown}: control or invisible character U+{ord(char):04X} in the name")
    encoded = name.encode("utf-8")
    if len(encoded) > max_path_bytes:
        raise InvalidArchive(f"{shown}: the path is longer than {max_path_bytes} bytes")
    components = name.split("/")
    if len(components) > max_depth:
        raise InvalidArchive(f"{shown}: the path is deeper than {max_depth} directories")
    for component in components:
        if component == "..":
            raise InvalidArchive(f"{shown}: '..' components are not allowed (path traversal)")
        if component in ("", "."):
            raise InvalidArchive(f"{shown}: empty or '.' path components are not allowed")
        if len(component.encode("utf-8")) > _MAX_COMPONENT_BYTES:
            raise InvalidArchive(f"{shown}: a path component is longer than {_MAX_COMPONENT_BYTES} bytes")
    return name


def _member_path(name: str, limits: ArchiveLimits) -> str | None:
    """The validated path of a tar member, or None for the archive root (``.`` or ``./``)."""
    if name in (".", "./"):
        return None
    # `tar -C dir -czf x.tgz .` writes every name with a leading "./"; that prefix is the only
    # non-canonical form accepted.
    if name.startswith("./"):
        name = name[2:]
    return _checked_path(name, limits.max_path_bytes, limits.max_depth)


# --- streaming with budgets ------------------------------------------------------------------------


class _CountingReader(io.RawIOBase):
    """Counts the compressed bytes handed to the decompressor."""

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self._raw.read(len(buffer))
        size = len(data)
        buffer[:size] = data
        self.count += size
        return size


class _BudgetedReader(io.RawIOBase):
    """Decompressed bytes, refused past ``max_stream_bytes`` or past the compression-ratio cap.

    Reads are clamped to the remaining budget, so a header that declares gigabytes makes the
    decompressor produce at most one byte more than the budget before the refusal.
    """

    def __init__(self, compressed: _CountingReader, limits: ArchiveLimits):
        self._compressed = compressed
        self._gzip = gzip.GzipFile(fileobj=compressed, mode="rb")
        self._limits = limits
        self._cap = limits.max_stream_bytes
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        wanted = min(len(buffer), self._cap - self.count + 1)
        data = self._decompress(wanted)
        size = len(data)
        buffer[:size] = data
        self.count += size
        if self.count > self._cap:
            raise InvalidArchive(
                f"the archive expands to more than {self._cap} bytes (files are limited to "
                f"{self._limits.max_total_bytes} bytes in total)"
            )
        if self.count > _RATIO_FLOOR_BYTES and self.count > self._limits.max_ratio * max(
            self._compressed.count, 1
        ):
            raise InvalidArchive(
                f"the archive's compression ratio is above {self._limits.max_ratio}:1 (a gzip bomb?)"
            )
        return size

    def _decompress(self, size: int) -> bytes:
        try:
            return self._gzip.read(size)
        except gzip.BadGzipFile:
            raise InvalidArchive("the archive is not gzip-compressed (an agent is a .tar.gz)") from None
        except EOFError:
            raise InvalidArchive("the archive is truncated (the gzip stream ends early)") from None
        except zlib.error as exc:
            raise InvalidArchive(f"the archive's gzip stream is corrupt: {exc}") from None


class _Sink:
    """Receives what a validated archive holds. The base class only lets the scan hash and count."""

    def begin_file(self, path: str, executable: bool) -> None:
        return

    def write(self, chunk: bytes) -> None:
        return

    def end_file(self) -> None:
        return


def _open_source(source: bytes | str | os.PathLike[str] | BinaryIO) -> tuple[BinaryIO, bool]:
    if isinstance(source, bytes | bytearray | memoryview):
        return io.BytesIO(bytes(source)), True
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if path.is_dir():
            raise InvalidArchive(f"{path} is a directory; pack it with pack_directory() first")
        return path.open("rb"), True
    return source, False


def _member_kind_error(member: tarfile.TarInfo, shown: str) -> InvalidArchive:
    if member.issym():
        return InvalidArchive(f"{shown}: symbolic links are not allowed")
    if member.islnk():
        return InvalidArchive(f"{shown}: hard links are not allowed")
    if member.ischr() or member.isblk():
        return InvalidArchive(f"{shown}: device files are not allowed")
    if member.isfifo():
        return InvalidArchive(f"{shown}: FIFOs are not allowed")
    if member.issparse():
        return InvalidArchive(f"{shown}: sparse files are not allowed")
    return InvalidArchive(
        f"{shown}: member type {member.type!r} is not allowed (only regular files and directories)"
    )


class _Scan:
    """One pass over an archive: every check, the file hashes, and the bytes handed to a sink."""

    def __init__(self, limits: ArchiveLimits, sink: _Sink):
        self._limits = limits
        self._sink = sink
        self._files: dict[str, AgentFile] = {}
        self._directories: set[str] = set()
        self._entries = 0
        self._total = 0

    def run(self, source: bytes | str | os.PathLike[str] | BinaryIO) -> AgentManifest:
        raw, owned = _open_source(source)
        try:
            compressed = _CountingReader(raw)
            stream = _BudgetedReader(compressed, self._limits)
            try:
                with tarfile.open(fileobj=stream, mode="r|") as archive:
                    for member in archive:
                        self._member(archive, member)
            except tarfile.TarError as exc:
                raise InvalidArchive(f"not a valid tar archive: {exc}") from None
            self._check_trailer(stream)
        finally:
            if owned:
                raw.close()
        if DOCKERFILE not in self._files:
            raise InvalidArchive("the agent has no Dockerfile at its root")
        return AgentManifest(files=tuple(self._files[path] for path in sorted(self._files)))

    def _check_trailer(self, stream: _BudgetedReader) -> None:
        """Drain the rest of the gzip stream (still within the budget): it must be complete, CRC included."""
        while stream.read(_CHUNK):
            pass

    def _count_entry(self, shown: str) -> None:
        self._entries += 1
        if self._entries > 2 * self._limits.max_files:
            raise InvalidArchive(f"{shown}: the archive has more than {2 * self._limits.max_files} entries")

    def _member(self, archive: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        shown = ascii(member.name)
        self._count_entry(shown)
        path = _member_path(member.name, self._limits)
        if path is None:
            if not member.isdir():
                raise InvalidArchive(f"{shown}: the archive root must be a directory")
            return
        if member.isdir():
            self._add_directory(path, shown)
        elif member.type in (tarfile.REGTYPE, tarfile.AREGTYPE) and not member.issparse():
            self._add_file(archive, member, path, shown)
        else:
            raise _member_kind_error(member, shown)

    def _add_directory(self, path: str, shown: str) -> None:
        if path in self._directories:
            raise InvalidArchive(f"{shown}: duplicate path")
        if path in self._files:
            raise InvalidArchive(f"{shown}: the path is both a file and a directory")
        self._directories.add(path)
        self._add_parents(path, shown)

    def _add_parents(self, path: str, shown: str) -> None:
        parts = path.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent in self._files:
                raise InvalidArchive(f"{shown}: its parent {parent!a} is a file")
            self._directories.add(parent)

    @staticmethod
    def _read(data: BinaryIO, shown: str) -> bytes:
        try:
            return data.read(_CHUNK)
        except tarfile.TarError:
            raise InvalidArchive(f"{shown}: truncated (the archive ends inside the file)") from None

    def _add_file(self, archive: tarfile.TarFile, member: tarfile.TarInfo, path: str, shown: str) -> None:
        limits = self._limits
        if path in self._files:
            raise InvalidArchive(f"{shown}: duplicate path")
        if path in self._directories:
            raise InvalidArchive(f"{shown}: the path is both a file and a directory")
        if len(self._files) >= limits.max_files:
            raise InvalidArchive(f"{shown}: the archive has more than {limits.max_files} files")
        if member.size > limits.max_file_bytes:
            raise InvalidArchive(
                f"{shown}: {member.size} bytes, above the {limits.max_file_bytes}-byte limit"
            )
        if self._total + member.size > limits.max_total_bytes:
            raise InvalidArchive(f"{shown}: the files exceed {limits.max_total_bytes} bytes in total")
        self._add_parents(path, shown)
        executable = bool(member.mode & 0o111)
        data = archive.extractfile(member)
        if data is None:  # tarfile returns None only for non-regular members, refused above
            raise InvalidArchive(f"{shown}: cannot read the member")
        digest = hashlib.sha256()
        size = 0
        self._sink.begin_file(path, executable)
        while chunk := self._read(data, shown):
            size += len(chunk)
            # Never more than declared (tarfile reads exactly member.size), but counted regardless.
            if size > member.size or self._total + size > limits.max_total_bytes:
                raise InvalidArchive(f"{shown}: more bytes than declared or allowed")
            digest.update(chunk)
            self._sink.write(chunk)
        self._sink.end_file()
        if size != member.size:
            raise InvalidArchive(f"{shown}: truncated ({size} of {member.size} bytes)")
        self._total += size
        self._files[path] = AgentFile(path=path, sha256=digest.hexdigest(), size=size, executable=executable)


# --- public API ------------------------------------------------------------------------------------


def validate_archive(
    source: bytes | str | os.PathLike[str] | BinaryIO, limits: ArchiveLimits = DEFAULT_LIMITS
) -> AgentManifest:
    """Check an agent archive (``.tar.gz`` bytes, path or binary stream) and list its files.

    Raises :class:`InvalidArchive` for anything unsafe or malformed; nothing is written anywhere.
    """
    return _Scan(limits, _Sink()).run(source)


class _MemberSink(_Sink):
    def __init__(self, wanted: str):
        self._wanted = wanted
        self._capturing = False
        self.data: bytearray | None = None

    def begin_file(self, path: str, executable: bool) -> None:
        self._capturing = path == self._wanted
        if self._capturing:
            self.data = bytearray()

    def write(self, chunk: bytes) -> None:
        if self._capturing and self.data is not None:
            self.data += chunk

    def end_file(self) -> None:
        self._capturing = False


def read_archive_file(
    source: bytes | str | os.PathLike[str] | BinaryIO, path: str, limits: ArchiveLimits = DEFAULT_LIMITS
) -> bytes:
    """The bytes of one file of a valid archive (the whole archive is validated on the way)."""
    sink = _MemberSink(path)
    _Scan(limits, sink).run(source)
    if sink.data is None:
        raise NotFound(f"the agent has no file {path!r}")
    return bytes(sink.data)


class _DirectorySink(_Sink):
    """Writes files under a directory this process just created: no symlink is ever created in it."""

    def __init__(self, root: Path):
        self._root = root
        self._fd: int | None = None

    def begin_file(self, path: str, executable: bool) -> None:
        target = self._root.joinpath(*path.split("/"))
        for parent in reversed(target.relative_to(self._root).parents):
            directory = self._root / parent
            if not directory.exists():
                directory.mkdir(mode=0o755)
                directory.chmod(0o755)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        self._fd = os.open(target, flags, 0o600)
        os.fchmod(self._fd, 0o755 if executable else 0o644)

    def write(self, chunk: bytes) -> None:
        if self._fd is None:
            raise InvalidArchive("internal error: write outside a file")
        view = memoryview(chunk)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def end_file(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        self.end_file()


def extract_archive(
    source: bytes | str | os.PathLike[str] | BinaryIO,
    dest_dir: str | os.PathLike[str],
    limits: ArchiveLimits = DEFAULT_LIMITS,
) -> AgentManifest:
    """Validate and extract an agent archive into ``dest_dir``, which must not exist yet.

    Files get mode 0755 (any execute bit set in the archive) or 0644; directories 0755. On any refusal
    ``dest_dir`` is removed again, so a half-extracted agent never stays behind.
    """
    root = Path(dest_dir)
    if root.exists() or root.is_symlink():
        raise InvalidArchive(f"{root} already exists; extract into a new directory")
    root.mkdir(mode=0o755)
    root.chmod(0o755)
    sink = _DirectorySink(root)
    try:
        return _Scan(limits, sink).run(source)
    except BaseException:
        sink.close()
        shutil.rmtree(root, ignore_errors=True)
        raise


def _walk_directory(root: Path, limits: ArchiveLimits) -> Iterator[tuple[str, Path, os.stat_result]]:
    """Every regular file under ``root`` as (relative path, path, lstat); refuses anything else."""
    pending = [root]
    while pending:
        directory = pending.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                path = Path(entry.path)
                relative = path.relative_to(root).as_posix()
                shown = ascii(relative)
                _checked_path(relative, limits.max_path_bytes, limits.max_depth)
                info = path.lstat()
                if stat.S_ISLNK(info.st_mode):
                    raise InvalidArchive(f"{shown}: symbolic links are not allowed")
                if stat.S_ISDIR(info.st_mode):
                    pending.append(path)
                elif stat.S_ISREG(info.st_mode):
                    yield relative, path, info
                else:
                    raise InvalidArchive(f"{shown}: only regular files and directories are allowed")


def pack_directory(path: str | os.PathLike[str], limits: ArchiveLimits = DEFAULT_LIMITS) -> bytes:
    """A deterministic ``.tar.gz`` of an agent directory: the same files always give the same bytes.

    Files only (directories are implied), sorted by path, mtime 0, uid/gid 0 without names, mode 0755
    or 0644, gzip header without name or time. Symlinks and special files are refused. The result is
    validated with the same ``limits`` before it is returned.
    """
    root = Path(path)
    if root.is_symlink() or not root.is_dir():
        raise InvalidArchive(f"{root} is not a directory")
    files: list[tuple[str, Path, os.stat_result]] = []
    total = 0
    for relative, file_path, info in _walk_directory(root, limits):
        if len(files) >= limits.max_files:
            raise InvalidArchive(f"the directory has more than {limits.max_files} files")
        if info.st_size > limits.max_file_bytes:
            raise InvalidArchive(
                f"{relative!a}: {info.st_size} bytes, above the {limits.max_file_bytes}-byte limit"
            )
        total += info.st_size
        if total > limits.max_total_bytes:
            raise InvalidArchive(f"the files exceed {limits.max_total_bytes} bytes in total")
        files.append((relative, file_path, info))
    files.sort(key=lambda item: item[0])

    buffer = io.BytesIO()
    with (
        gzip.GzipFile(filename="", fileobj=buffer, mode="wb", compresslevel=9, mtime=0) as compressed,
        tarfile.open(fileobj=compressed, mode="w", format=tarfile.PAX_FORMAT) as archive,
    ):
        for relative, file_path, info in files:
            member = tarfile.TarInfo(relative)
            member.size = info.st_size
            member.mode = 0o755 if info.st_mode & 0o111 else 0o644
            member.mtime = 0
            member.uid = member.gid = 0
            member.uname = member.gname = ""
            member.type = tarfile.REGTYPE
            with file_path.open("rb") as data:
                try:
                    archive.addfile(member, data)
                except OSError as exc:
                    raise InvalidArchive(f"{relative!a}: changed while it was packed ({exc})") from None
    packed = buffer.getvalue()
    validate_archive(packed, limits)
    return packed
