"""Agent archives: the hostile corpus, deterministic digests, packing and extraction (hivemind.archive)."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
from pydantic import ValidationError

from hivemind.archive import (
    DEFAULT_LIMITS,
    AgentFile,
    AgentManifest,
    ArchiveLimits,
    extract_archive,
    pack_directory,
    read_archive_file,
    source_digest,
    validate_archive,
)
from hivemind.errors import InvalidArchive, InvalidInput, NotFound

DOCKERFILE = b"FROM hivemind/agent-base:local\nCOPY main.py /agent/main.py\n"
MAIN = b"print('hello')\n"


def _file(name: str, data: bytes, mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    return info, data


def _special(name: str, kind: bytes, **fields: object) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in fields.items():
        setattr(info, key, value)
    return info, None


def make_archive(
    *members: tuple[tarfile.TarInfo, bytes | None],
    with_dockerfile: bool = True,
    fmt: int = tarfile.PAX_FORMAT,
) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tar:
        if with_dockerfile:
            info, data = _file("Dockerfile", DOCKERFILE)
            tar.addfile(info, io.BytesIO(data))
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return gzip.compress(raw.getvalue(), mtime=0)


def refused(archive: bytes, limits: ArchiveLimits = DEFAULT_LIMITS) -> str:
    with pytest.raises(InvalidArchive) as caught:
        validate_archive(archive, limits)
    assert caught.value.code == "invalid_archive"
    assert isinstance(caught.value, InvalidInput)
    return caught.value.message


def write_agent(root: Path) -> Path:
    (root / "lib").mkdir(parents=True)
    (root / "Dockerfile").write_bytes(DOCKERFILE)
    (root / "main.py").write_bytes(MAIN)
    (root / "lib" / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "lib" / "run.sh").chmod(0o750)
    return root


# --- the hostile corpus: each refused, with a message naming the member ------------------------------


@pytest.mark.parametrize(
    ("member", "expected"),
    [
        (_file("/etc/passwd", b"x"), "'/etc/passwd': absolute paths are not allowed"),
        (_file("../escape.py", b"x"), "'../escape.py': '..' components are not allowed"),
        (_file("a/../../escape.py", b"x"), "'a/../../escape.py': '..' components"),
        (_file("a//b.py", b"x"), "'a//b.py': empty or '.' path components"),
        (_file("a/./b.py", b"x"), "'a/./b.py': empty or '.' path components"),
        (_special("link", tarfile.SYMTYPE, linkname="/etc/passwd"), "'link': symbolic links are not allowed"),
        (_special("hard", tarfile.LNKTYPE, linkname="Dockerfile"), "'hard': hard links are not allowed"),
        (_special("null", tarfile.CHRTYPE, devmajor=1, devminor=3), "'null': device files are not allowed"),
        (_special("disk", tarfile.BLKTYPE, devmajor=8, devminor=0), "'disk': device files are not allowed"),
        (_special("pipe", tarfile.FIFOTYPE), "'pipe': FIFOs are not allowed"),
        (_special("contig", tarfile.CONTTYPE), "'contig': member type b'7' is not allowed"),
        (_file("a\\b.py", b"x"), "backslashes are not allowed"),
        (_file("bell\x07.py", b"x"), "control or invisible character U+0007"),
        (_file("new\nline.py", b"x"), "control or invisible character U+000A"),
        (_file("evil\u202egnp.py", b"x"), "control or invisible character U+202E"),
        (_file("zero\u200bwidth.py", b"x"), "control or invisible character U+200B"),
        (_file("bad\udcff.py", b"x"), "the name is not valid UTF-8"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_hostile_member_is_refused_by_name(
    member: tuple[tarfile.TarInfo, bytes | None], expected: str
) -> None:
    fmt = tarfile.USTAR_FORMAT if "\udcff" in member[0].name else tarfile.PAX_FORMAT
    assert expected in refused(make_archive(member, fmt=fmt))


def test_nul_in_a_pax_path_is_refused() -> None:
    info, data = _file("placeholder.py", b"x")
    info.pax_headers = {"path": "inno\x00cent.py"}
    assert "U+0000" in refused(make_archive((info, data)))


def test_duplicate_paths_and_file_directory_clashes_are_refused() -> None:
    assert "'main.py': duplicate path" in refused(
        make_archive(_file("main.py", b"1"), _file("main.py", b"2"))
    )
    assert "'./Dockerfile': duplicate path" in refused(make_archive(_file("./Dockerfile", b"FROM x")))
    directory = _special("lib", tarfile.DIRTYPE)
    assert "both a file and a directory" in refused(make_archive(_file("lib", b"x"), directory))
    assert "its parent 'lib' is a file" in refused(make_archive(_file("lib", b"x"), _file("lib/a.py", b"")))


def test_too_many_files_too_big_and_too_deep_are_refused() -> None:
    small = ArchiveLimits(max_files=3, max_file_bytes=1000, max_total_bytes=1500, max_depth=3)
    many = [_file(f"f{index}.py", b"x") for index in range(3)]
    assert "more than 3 files" in refused(make_archive(*many), small)
    assert "'big.bin': 1001 bytes, above the 1000-byte limit" in refused(
        make_archive(_file("big.bin", b"x" * 1001)), small
    )
    assert "exceed 1500 bytes in total" in refused(
        make_archive(_file("a.bin", b"x" * 900), _file("b.bin", b"x" * 900)), small
    )
    assert "deeper than 3 directories" in refused(make_archive(_file("a/b/c/d.py", b"")), small)
    assert "longer than 512 bytes" in refused(make_archive(_file("x" * 200 + "/" + "y" * 320, b"")))


def test_gzip_bomb_is_refused_by_ratio_before_it_is_inflated() -> None:
    # 40 MiB of zeros is within the 50 MiB file limit but compresses about 1000:1.
    bomb = make_archive(_file("zeros.bin", bytes(40 * 1024 * 1024)))
    assert len(bomb) < 100_000
    assert "compression ratio is above 200:1" in refused(bomb)


def test_header_bomb_is_refused_by_the_decompressed_budget() -> None:
    # A huge PAX header: no file is big, yet tarfile would read the whole header into memory.
    limits = ArchiveLimits(max_files=2, max_total_bytes=64 * 1024)
    info, data = _file("main.py", b"x")
    info.pax_headers = {"comment": "z" * (512 * 1024)}
    assert "expands to more than" in refused(make_archive((info, data)), limits)


def test_lying_and_truncated_archives_are_refused() -> None:
    good = make_archive(_file("main.py", MAIN))
    raw = gzip.decompress(good)
    assert "not gzip-compressed" in refused(raw)
    assert "truncated" in refused(good[: len(good) - 12])
    assert "not a valid tar archive" in refused(gzip.compress(b"this is not a tar file" * 40))
    # The header declares 100 bytes; the stream ends after 10.
    info = tarfile.TarInfo("short.py")
    info.size = 100
    header = info.tobuf(tarfile.USTAR_FORMAT)
    assert "'short.py': truncated" in refused(gzip.compress(header + b"0123456789"))


def test_dockerfile_must_be_at_the_root() -> None:
    assert refused(make_archive(_file("main.py", MAIN), with_dockerfile=False)) == (
        "the agent has no Dockerfile at its root"
    )
    nested = make_archive(_file("sub/Dockerfile", DOCKERFILE), with_dockerfile=False)
    assert refused(nested) == "the agent has no Dockerfile at its root"


def test_a_directory_is_not_an_archive(tmp_path: Path) -> None:
    assert "pack it with pack_directory()" in refused(str(tmp_path))  # type: ignore[arg-type]


# --- manifests and digests ----------------------------------------------------------------------------


def test_manifest_lists_files_with_hashes_and_exec_bits() -> None:
    manifest = validate_archive(
        make_archive(
            _special("./", tarfile.DIRTYPE),
            _special("./lib", tarfile.DIRTYPE),
            _file("./lib/run.sh", b"#!/bin/sh\n", mode=0o700),
            _file("./main.py", MAIN),
        )
    )
    assert [entry.path for entry in manifest.files] == ["Dockerfile", "lib/run.sh", "main.py"]
    assert manifest.file("lib/run.sh").executable is True
    assert manifest.file("main.py").executable is False
    assert manifest.file("main.py").size == len(MAIN)
    assert manifest.total_size == len(DOCKERFILE) + len(MAIN) + len(b"#!/bin/sh\n")
    assert set(manifest.file_digests()) == {"Dockerfile", "lib/run.sh", "main.py"}
    with pytest.raises(NotFound):
        manifest.file("missing.py")
    assert AgentManifest.model_validate_json(manifest.model_dump_json()) == manifest


def test_manifest_model_refuses_unsorted_duplicate_or_unsafe_files() -> None:
    docker = AgentFile(path="Dockerfile", sha256="0" * 64, size=1, executable=False)
    main = AgentFile(path="main.py", sha256="1" * 64, size=1, executable=False)
    with pytest.raises(ValidationError, match="sorted by path and unique"):
        AgentManifest(files=(main, docker))
    with pytest.raises(ValidationError, match="sorted by path and unique"):
        AgentManifest(files=(docker, docker))
    with pytest.raises(ValidationError, match="Dockerfile"):
        AgentManifest(files=(main,))
    with pytest.raises(InvalidArchive, match=r"'\.\.' components"):
        AgentManifest(files=(docker, AgentFile(path="../x", sha256="2" * 64, size=1, executable=False)))


def test_digest_depends_on_content_not_on_packing(tmp_path: Path) -> None:
    agent = write_agent(tmp_path / "agent")
    ours = validate_archive(pack_directory(agent))
    # GNU tar: directory entries, "./" prefixes, real mtimes and owners, its own member order.
    os.utime(agent / "main.py", (1_700_000_000, 1_700_000_000))
    theirs_bytes = subprocess.run(
        ["tar", "--owner=1234", "--group=99", "-C", str(agent), "-czf", "-", "."],
        capture_output=True,
        check=True,
    ).stdout
    theirs = validate_archive(theirs_bytes)
    assert theirs == ours
    assert source_digest(theirs) == source_digest(ours) == ours.digest
    assert len(ours.digest) == 64

    (agent / "main.py").write_bytes(MAIN.replace(b"hello", b"hellp"))
    changed_byte = validate_archive(pack_directory(agent)).digest
    (agent / "main.py").write_bytes(MAIN)
    (agent / "main.py").chmod(0o755)
    changed_mode = validate_archive(pack_directory(agent)).digest
    (agent / "main.py").chmod(0o644)
    (agent / "main.py").rename(agent / "main2.py")
    renamed = validate_archive(pack_directory(agent)).digest
    assert len({ours.digest, changed_byte, changed_mode, renamed}) == 4


def test_digest_is_jcs_of_the_sorted_file_list() -> None:
    manifest = AgentManifest(files=(AgentFile(path="Dockerfile", sha256="a" * 64, size=3, executable=False),))
    expected = hashlib.sha256(
        b'[{"executable":false,"path":"Dockerfile","sha256":"' + b"a" * 64 + b'","size":3}]'
    ).hexdigest()
    assert source_digest(manifest) == expected


# --- packing and extraction ---------------------------------------------------------------------------


def test_pack_directory_is_deterministic_and_normalized(tmp_path: Path) -> None:
    agent = write_agent(tmp_path / "agent")
    first = pack_directory(agent)
    os.utime(agent / "Dockerfile", (1, 1))
    (agent / "main.py").chmod(0o600)
    second = pack_directory(agent)
    assert first == second
    assert first[4:8] == b"\x00\x00\x00\x00"  # gzip mtime
    with tarfile.open(fileobj=io.BytesIO(first), mode="r:gz") as tar:
        members = tar.getmembers()
    assert [member.name for member in members] == ["Dockerfile", "lib/run.sh", "main.py"]
    assert [(m.mode, m.uid, m.gid, m.mtime, m.uname, m.gname) for m in members] == [
        (0o644, 0, 0, 0, "", ""),
        (0o755, 0, 0, 0, "", ""),
        (0o644, 0, 0, 0, "", ""),
    ]


@pytest.mark.parametrize("kind", ["file-link", "dir-link", "fifo"])
def test_pack_directory_refuses_links_and_special_files(tmp_path: Path, kind: str) -> None:
    agent = write_agent(tmp_path / "agent")
    if kind == "file-link":
        (agent / "passwd").symlink_to("/etc/passwd")
        expected = "'passwd': symbolic links are not allowed"
    elif kind == "dir-link":
        (agent / "etc").symlink_to("/etc", target_is_directory=True)
        expected = "'etc': symbolic links are not allowed"
    else:
        os.mkfifo(agent / "pipe")
        expected = "'pipe': only regular files and directories"
    with pytest.raises(InvalidArchive, match=expected):
        pack_directory(agent)


def test_pack_directory_enforces_limits_and_needs_a_dockerfile(tmp_path: Path) -> None:
    agent = write_agent(tmp_path / "agent")
    with pytest.raises(InvalidArchive, match="more than 2 files"):
        pack_directory(agent, ArchiveLimits(max_files=2))
    (agent / "Dockerfile").unlink()
    with pytest.raises(InvalidArchive, match="no Dockerfile"):
        pack_directory(agent)


def test_pack_extract_round_trip(tmp_path: Path) -> None:
    agent = write_agent(tmp_path / "agent")
    (agent / "empty-dir").mkdir()
    packed = pack_directory(agent)
    out = tmp_path / "out"
    manifest = extract_archive(packed, out)
    assert manifest == validate_archive(packed)
    assert (out / "main.py").read_bytes() == MAIN
    assert (out / "lib" / "run.sh").stat().st_mode & 0o777 == 0o755
    assert (out / "Dockerfile").stat().st_mode & 0o777 == 0o644
    assert not (out / "empty-dir").exists()  # empty directories are not part of an agent
    assert validate_archive(pack_directory(out)).digest == manifest.digest
    assert read_archive_file(packed, "lib/run.sh") == b"#!/bin/sh\necho hi\n"
    with pytest.raises(NotFound):
        read_archive_file(packed, "nope.py")


def test_extract_refuses_an_existing_destination_and_cleans_up_on_refusal(tmp_path: Path) -> None:
    packed = make_archive(_file("main.py", MAIN))
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(InvalidArchive, match="already exists"):
        extract_archive(packed, existing)
    # The hostile member comes after a good one: the good one must not stay behind.
    hostile = make_archive(_file("main.py", MAIN), _file("../../escape.py", b"x"))
    target = tmp_path / "target"
    with pytest.raises(InvalidArchive, match=r"'\.\.' components"):
        extract_archive(hostile, target)
    assert not target.exists()
    assert not (tmp_path / "escape.py").exists()
    bomb = make_archive(_file("zeros.bin", bytes(8 * 1024 * 1024)))
    with pytest.raises(InvalidArchive, match="compression ratio"):
        extract_archive(bomb, target)
    assert not target.exists()


def test_archive_is_read_from_a_path_or_a_stream(tmp_path: Path) -> None:
    packed = make_archive(_file("main.py", MAIN))
    path = tmp_path / "agent.tar.gz"
    path.write_bytes(packed)
    assert validate_archive(path) == validate_archive(str(path)) == validate_archive(io.BytesIO(packed))
