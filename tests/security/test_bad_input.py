"""Bad input corpus: malformed JSON, oversized bodies, Unicode edge cases, hostile archives, malformed
links and policies through the API and the CLI, SQL injection through the scoped engine. Every case is
a clear 4xx (or a clear CLI usage error), never a 5xx or a traceback, and nothing is half-written."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
from security_support import deployment_snapshot, snapshot_difference

from hivemind.archive import validate_archive
from hivemind.encoding import b64encode, sha256_hex
from hivemind.errors import InvalidArchive, InvalidLink, InvalidPolicy
from hivemind.manifest import parse_link
from hivemind.models import Stage
from hivemind.policy import parse_policy
from hivemind_runner.scoped import ItemInfo, RoomItem, SqlRejected, build_scoped_database

REPO = Path(__file__).resolve().parents[2]

# --- JSON bodies ------------------------------------------------------------------------------------

MALFORMED_BODIES: dict[str, bytes] = {
    "not-json": b"{name: 1}",
    "truncated": b'{"name": "a"',
    "array": b"[]",
    "null": b"null",
    "string": b'"hello"',
    "duplicate-key": b'{"name": "a", "name": "b"}',
    "nan": b'{"amount": NaN}',
    "infinity": b'{"amount": Infinity}',
    "lone-surrogate": b'{"name": "\\ud800"}',
    "invalid-utf8": b'{"name": "\xff\xfe"}',
    "deep-nesting": b'{"a":' * 200 + b"1" + b"}" * 200,
    "huge-number": b'{"amount": 1' + b"0" * 5000 + b"}",
    "bom": b'\xef\xbb\xbf{"name": "a"}',
}
POST_ROUTES = [
    "/v1/rooms",
    "/v1/room-agents",
    "/v1/signup",
    "/v1/billing/credit-codes/redeem",
    "/v1/rooms/{room}/invites",
    "/v1/rooms/{room}/data",
    "/v1/rooms/{room}/runs",
]


@pytest.mark.moto_server
def test_malformed_json_is_400_on_every_route_and_writes_nothing(hm_lambda: Any) -> None:
    hm = hm_lambda
    alice = hm.tenant("alice")
    room = hm.room(alice)
    before = deployment_snapshot(hm.store)
    for route in POST_ROUTES:
        path = route.format(room=room.room_id)
        for name, body in MALFORMED_BODIES.items():
            response = hm.api.post(
                path, token=alice.token, content=body, headers={"content-type": "application/json"}
            )
            assert response.status in (400, 413), (path, name, response.status, response.body[:200])
            assert response.error in {"invalid_json", "invalid_input", "payload_too_large"}, (path, name)
            assert b"Traceback" not in response.body
    assert snapshot_difference(before, deployment_snapshot(hm.store)) == {}


@pytest.mark.moto_server
def test_an_oversized_body_is_413_whatever_content_length_says(hm_lambda: Any) -> None:
    hm = hm_lambda
    alice = hm.tenant("alice")
    limit = 5 * 1024 * 1024
    body = b'{"name": "' + b"a" * (limit + 10) + b'"}'
    for headers in (
        {"content-type": "application/json"},
        {"content-type": "application/json", "content-length": "10"},
    ):
        response = hm.api.post("/v1/room-agents", token=alice.token, content=body, headers=headers)
        assert (response.status, response.error) == (413, "payload_too_large")


UNICODE_NAMES = {
    "bidi-override": "report\u202etxt.exe",
    "zero-width": "a\u200bb",
    "nul": "a\x00b",
    "control": "a\x07b",
    "leading-space": " name",
    "trailing-newline": "name\n",
    "line-separator": "a\u2028b",
    "bom-inside": "a\ufeffb",
    "too-long": "x" * 5000,
}


@pytest.mark.moto_server
@pytest.mark.parametrize("case", sorted(UNICODE_NAMES))
def test_unicode_edge_cases_in_shown_text_are_refused(hm_lambda: Any, case: str) -> None:
    hm = hm_lambda
    alice = hm.tenant("alice")
    archive = hm.archive()
    body = {
        "name": UNICODE_NAMES[case],
        "visibility": "inspectable",
        "size": len(archive),
        "sha256": sha256_hex(archive),
        "source_digest": validate_archive(archive).digest,
    }
    before = deployment_snapshot(hm.store)
    response = hm.api.post("/v1/room-agents", token=alice.token, json=body)
    assert (response.status, response.error) == (400, "invalid_input"), response.body[:200]
    assert UNICODE_NAMES[case][:50] not in response.body.decode("utf-8", "replace")  # never echoed
    assert snapshot_difference(before, deployment_snapshot(hm.store)) == {}


@pytest.mark.moto_server
def test_legitimate_unicode_is_fine(hm_lambda: Any) -> None:
    hm = hm_lambda
    alice = hm.tenant("alice")
    agent = hm.agent(alice, name="Größe 数据 😀 café")
    assert (
        hm.api.get(f"/v1/room-agents/{agent.agent_id}", token=alice.token).ok()["name"]
        == "Größe 数据 😀 café"
    )


# --- hostile archives -----------------------------------------------------------------------------


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return gzip.compress(raw.getvalue(), mtime=0)


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    return info, data


def _special(name: str, kind: bytes, target: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


DOCKERFILE = _file("Dockerfile", b"FROM hivemind/agent-base:local\n")
HOSTILE_ARCHIVES: dict[str, bytes] = {
    "path-traversal": _tar([DOCKERFILE, _file("../../etc/cron.d/x")]),
    "absolute-path": _tar([DOCKERFILE, _file("/etc/passwd")]),
    "symlink": _tar([DOCKERFILE, _special("link", tarfile.SYMTYPE, "/etc/shadow")]),
    "hard-link": _tar([DOCKERFILE, _special("hard", tarfile.LNKTYPE, "Dockerfile")]),
    "char-device": _tar([DOCKERFILE, _special("dev", tarfile.CHRTYPE)]),
    "fifo": _tar([DOCKERFILE, _special("fifo", tarfile.FIFOTYPE)]),
    "bidi-name": _tar([DOCKERFILE, _file("main\u202epy.txt")]),
    "duplicate-member": _tar([DOCKERFILE, _file("a.py"), _file("a.py", b"y")]),
    "zip-bomb": _tar([DOCKERFILE, _file("bomb.bin", bytes(200 * 1024 * 1024))]),
    "not-gzip": b"PK\x03\x04 this is a zip file",
    "empty": b"",
}


@pytest.mark.parametrize("case", sorted(HOSTILE_ARCHIVES))
def test_hostile_archives_are_refused_by_the_validator(case: str) -> None:
    with pytest.raises(InvalidArchive) as refused:
        validate_archive(HOSTILE_ARCHIVES[case])
    assert refused.value.code == "invalid_archive"


@pytest.mark.moto_server
@pytest.mark.parametrize("case", ["path-traversal", "symlink", "hard-link", "char-device", "zip-bomb"])
def test_hostile_archive_commit_is_400_and_the_agent_stays_unusable(hm_lambda: Any, case: str) -> None:
    hm = hm_lambda
    alice = hm.tenant("alice")
    archive = HOSTILE_ARCHIVES[case]
    body = {
        "name": "hostile",
        "visibility": "inspectable",
        "size": len(archive),
        "sha256": sha256_hex(archive),
        "source_digest": "ab" * 32,
    }
    created = hm.api.post("/v1/room-agents", token=alice.token, json=body).ok(201)
    agent_id = created["agent"]["agent_id"]
    hm.put_upload(created["upload"], archive)
    refused = hm.api.post(
        f"/v1/room-agents/{agent_id}/commit",
        token=alice.token,
        json={"size": len(archive), "sha256": sha256_hex(archive)},
    )
    assert (refused.status, refused.error) == (400, "invalid_archive"), refused.body[:300]
    assert hm.api.get(f"/v1/room-agents/{agent_id}", token=alice.token).ok()["state"] == "pending"
    listed = hm.api.get("/v1/room-agents", token=alice.token).ok()["agents"]
    assert agent_id not in {agent["agent_id"] for agent in listed}


# --- links and policies ---------------------------------------------------------------------------


def _link(document: Any) -> str:
    return "hmroom://" + b64encode(json.dumps(document, separators=(",", ":")).encode())


GOOD_LINK_FIELDS = {
    "invite": "hmq_eaqseizeeutcokbjfivsyljof4ydcmrtgq2tmnzyhe5dwpb5hy7q",
    "owner_sign_pub": "UB4fGLPjFR6LJoTVoQe2o73KVMlAh_vgX68up3QYtTI",
    "room_id": "room_abc123",
    "service": "https://api.example.com",
}
MALFORMED_LINKS = {
    "wrong-scheme": "https://evil.example/room",
    "empty": "hmroom://",
    "not-base64": "hmroom://!!!!",
    "padded": _link(GOOD_LINK_FIELDS) + "==",
    "not-json": "hmroom://" + b64encode(b"not json"),
    "array": _link([1, 2]),
    "extra-field": _link({**GOOD_LINK_FIELDS, "admin": True}),
    "missing-field": _link({k: v for k, v in GOOD_LINK_FIELDS.items() if k != "invite"}),
    "plain-http-remote": _link({**GOOD_LINK_FIELDS, "service": "http://api.example.com"}),
    "credentials-in-url": _link({**GOOD_LINK_FIELDS, "service": "https://user:pw@api.example.com"}),
    "tenant-key-as-invite": _link(
        {**GOOD_LINK_FIELDS, "invite": "hmk_aaaqeayeaudaocajbifqydiob4ibceqtcqkrmfyydenbwha5dypq"}
    ),
    "bad-room-id": _link({**GOOD_LINK_FIELDS, "room_id": "room_../../x"}),
    "too-long": "hmroom://" + "A" * 5000,
}


@pytest.mark.parametrize("case", sorted(MALFORMED_LINKS))
def test_malformed_links_are_refused_without_echoing_them(case: str) -> None:
    with pytest.raises(InvalidLink) as refused:
        parse_link(MALFORMED_LINKS[case])
    assert GOOD_LINK_FIELDS["invite"] not in str(refused.value)


def _hmctl(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HMCTL_", "HIVEMIND_", "XDG_"))}
    env.update({"HOME": str(home), "HMCTL_NO_INPUT": "1"})
    return subprocess.run(
        [sys.executable, "-m", "hmctl", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.slow
def test_the_cli_refuses_malformed_links_and_bad_arguments_with_usage_errors(tmp_path: Path) -> None:
    assert _hmctl(tmp_path, "init", "p", "--service", "http://127.0.0.1:1", "--json").returncode == 0
    cases = [
        ("room", "inspect", MALFORMED_LINKS["extra-field"]),
        ("room", "inspect", MALFORMED_LINKS["plain-http-remote"]),
        ("room", "accept", MALFORMED_LINKS["not-base64"], "--manifest-hash", "ab" * 32),
        ("init", "q", "--service", "ftp://example.com"),
        ("init", "../escape", "--service", "http://127.0.0.1:1"),
    ]
    for args in cases:
        result = _hmctl(tmp_path, "--profile", "p", *args) if args[0] == "room" else _hmctl(tmp_path, *args)
        assert result.returncode == 2, (args, result.returncode, result.stderr[-500:])
        assert "Traceback" not in result.stderr
        assert GOOD_LINK_FIELDS["invite"] not in result.stderr + result.stdout


MALFORMED_POLICIES: dict[str, Any] = {
    "unknown-field": {"tables": {}, "admin": True},
    "float-group-size": {"aggregate": {"min_group_size": 5.0}},
    "string-group-size": {"aggregate": {"min_group_size": "5"}},
    "wildcard-column": {"tables": {"people": {"columns": ["*"]}}},
    "subquery-filter": {"tables": {"people": {"columns": ["a"], "where": "a IN (SELECT a FROM other)"}}},
    "comment-filter": {"tables": {"people": {"columns": ["a"], "where": "a = 1 -- OR 1=1"}}},
    "stacked-filter": {"tables": {"people": {"columns": ["a"], "where": "a = 1; DELETE FROM people"}}},
    "function-filter": {"tables": {"people": {"columns": ["a"], "where": "lower(a) = 'x'"}}},
    "other-table-filter": {"tables": {"people": {"columns": ["a"], "where": "visits.a = 1"}}},
    "catastrophic-regex": {"output": {"deny": ["(a+)+$"]}},
    "backreference": {"items": {"redact": ["(a)\\1"]}},
    "unknown-function": {"aggregate": {"functions": ["GROUP_CONCAT"]}},
    "negative-rows": {"max_rows": -1},
    "not-an-object": ["tables"],
}


@pytest.mark.parametrize("case", sorted(MALFORMED_POLICIES))
def test_malformed_policies_are_refused(case: str) -> None:
    with pytest.raises(InvalidPolicy):
        parse_policy(MALFORMED_POLICIES[case])


@pytest.mark.moto_server
def test_a_room_with_a_malformed_data_policy_is_400_and_not_created(hm_lambda: Any) -> None:
    hm = hm_lambda
    alice = hm.tenant("alice")
    scope = hm.agent(alice)
    signed = hm.sign(alice, hm.manifest(alice, scope=scope)).model_dump(mode="json")
    signed["manifest"]["data_policy"] = MALFORMED_POLICIES["stacked-filter"]
    before = deployment_snapshot(hm.store)
    response = hm.api.post(
        "/v1/rooms", token=alice.token, json={"signed_manifest": signed, "owner_wrap": "A" * 80}
    )
    assert response.status == 400, response.body[:300]
    assert response.error in {"invalid_input", "manifest_invalid"}
    assert snapshot_difference(before, deployment_snapshot(hm.store)) == {}


# --- SQL injection through the scoped engine (what the bridge's sql tool runs) -------------------

SQL_INJECTIONS = [
    "SELECT COUNT(*) FROM people; DROP TABLE people",
    "SELECT name, COUNT(*) FROM people GROUP BY name",
    "SELECT * FROM people",
    "SELECT COUNT(*) FROM sqlite_master",
    "SELECT COUNT(*) FROM main.people",
    "SELECT COUNT(*) FROM pragma_table_info('people')",
    "ATTACH DATABASE '/tmp/x.db' AS x",
    "PRAGMA table_info(people)",
    "SELECT load_extension('/tmp/evil.so')",
    "INSERT INTO people (department) VALUES ('x')",
    "UPDATE people SET salary = 0",
    "SELECT department, COUNT(*) FROM people GROUP BY department UNION SELECT name, 1 FROM people",
    "WITH x AS (SELECT * FROM people) SELECT COUNT(*) FROM x",
    "SELECT department, SUM(CASE WHEN salary > 50005 THEN 1 ELSE 0 END) FROM people GROUP BY department",
    "SELECT department, AVG(DISTINCT salary) FROM people GROUP BY department",
    "SELECT rowid, COUNT(*) FROM people GROUP BY rowid",
    'SELECT "region", COUNT(*) FROM people GROUP BY "region"',
    "SELECT department, group_concat(salary) FROM people GROUP BY department",
    "SELECT COUNT(*) FROM people WHERE department = ?",
    "SELECT randomblob(1000000000)",
    "",
    "\x00",
]


def test_sql_injection_attempts_are_refused_and_change_nothing() -> None:
    data = b"name,department,salary,region\n" + b"".join(
        f"P{i},{'eng' if i % 2 else 'ops'},{50_000 + i},eu\n".encode() for i in range(20)
    )
    info = ItemInfo(id="item_people", name="people.csv", content_type="text/csv", size=len(data), metadata={})
    policy = parse_policy(
        {
            "tables": {"people": {"columns": ["department", "salary"], "where": "region = 'eu'"}},
            "aggregate": {"required": True, "min_group_size": 5, "functions": ["COUNT", "SUM", "AVG"]},
        }
    )
    with build_scoped_database([RoomItem.from_bytes(info, data)], policy) as database:
        image = database.snapshot()
        for sql in SQL_INJECTIONS:
            with pytest.raises(SqlRejected) as refused:
                database.query(sql, role=Stage.QUERY)
            assert refused.value.status in (400, 403), sql
        assert database.snapshot() == image
        # A comment is dropped before SQLite sees the query (it runs the regenerated tree): inert.
        commented = database.query("SELECT COUNT(*) AS n FROM people -- ' OR 1=1", role=Stage.QUERY)
        assert commented.rows == [[20]]
        assert database.query(
            "SELECT department, COUNT(*) AS n FROM people GROUP BY department", role=Stage.QUERY
        ).rows
