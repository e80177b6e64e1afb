"""The archive format's pure parts: DynamoDB wire values survive JSON exactly; bad archives are refused."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from hivemind.errors import IntegrityError
from hivemind.store import transfer


def test_wire_values_round_trip_through_json_including_binary_and_sets() -> None:
    item = {
        "pk": {"S": "room_a"},
        "n": {"N": "12345678901234567890"},
        "blob": {"B": b"\x00\xffsealed"},
        "blobs": {"BS": [b"\x01", b"\x02"]},
        "tags": {"SS": ["b", "a"]},
        "nested": {"M": {"inner": {"L": [{"B": b"\x10"}, {"BOOL": True}, {"NULL": True}]}}},
    }
    encoded = json.loads(json.dumps(transfer._encode_item(item)))
    decoded = transfer._decode_item(encoded)
    assert decoded["blob"] == {"B": b"\x00\xffsealed"}
    assert sorted(decoded["blobs"]["BS"]) == [b"\x01", b"\x02"]
    assert decoded["nested"]["M"]["inner"]["L"][0] == {"B": b"\x10"}
    assert decoded["n"] == {"N": "12345678901234567890"}
    # Sets compare equal whatever order DynamoDB returns them in.
    assert transfer._encode_item(decoded) == transfer._encode_item({**item, "tags": {"SS": ["a", "b"]}})


def test_schema_digest_is_stable_and_names_the_keys() -> None:
    assert transfer.schema_digest() == transfer.schema_digest()
    assert len(transfer.schema_digest()) == 64


def _tar(path: Path, members: dict[str, bytes], *, symlink: str | None = None) -> None:
    with tarfile.open(path, "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        if symlink is not None:
            info = tarfile.TarInfo(symlink)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            archive.addfile(info)


@pytest.mark.parametrize(
    ("members", "symlink", "message"),
    [
        ({}, None, "manifest.json"),
        ({"manifest.json": b"{}"}, None, "manifest.json is invalid"),
        ({"manifest.json": b"{}", "notes.txt": b"hi"}, None, "unexpected member"),
        ({"manifest.json": b"{}"}, "blobs/000000001", "not a regular file"),
    ],
)
def test_malformed_archives_are_refused(
    tmp_path: Path, members: dict[str, bytes], symlink: str | None, message: str
) -> None:
    path = tmp_path / "archive.tar"
    _tar(path, members, symlink=symlink)
    with pytest.raises(IntegrityError, match=message) as caught:
        transfer.read_manifest(path)
    assert caught.value.code == "archive_corrupt"


def test_export_reader_fills_every_read_and_refuses_an_object_that_grew() -> None:
    reader = transfer._HashingReader(iter([b"abc", b"defgh", b"ij"]), 10)
    assert [reader.read(4), reader.read(5), reader.read(5), reader.read(5)] == [b"abcd", b"efghi", b"j", b""]
    assert reader.hasher.hexdigest() == hashlib.sha256(b"abcdefghij").hexdigest()
    grown = transfer._HashingReader(iter([b"abcdef"]), 4)
    with pytest.raises(IntegrityError) as caught:
        grown.read(6)
    assert caught.value.code == "export_object_changed"
