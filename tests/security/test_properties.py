"""DESIGN §16: one named test per property. Where another suite already proves a property in more depth,
the test here is the short end-to-end statement of it and docs/threat-model.md names the deeper tests.
"""

from __future__ import annotations

import ast
import json
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from runner_scenarios import untrusted_runner_run
from security_support import AnyCollateral, genuine_quote_for, tdx_document
from support.rooms import Tenant, build_manifest

from hivemind import attestation as attestation_module
from hivemind.attestation import verify_attestation
from hivemind.canonical import canonical_json
from hivemind.encoding import b64encode
from hivemind.envelope import HpkeKeyPair
from hivemind.errors import (
    FloatInSignedDocument,
    HivemindError,
    InsufficientCredit,
    InvalidInput,
    InvalidPolicy,
    ManifestError,
    ReceiptError,
    ReportDataMismatch,
    SealError,
    WrapError,
)
from hivemind.keys import new_dek, public_bytes, unwrap_dek, wrap_dek
from hivemind.ledger import entry_hash
from hivemind.manifest import (
    AgentRef,
    KeyRotation,
    RoomManifest,
    SignedManifest,
    rotated_revision,
    sign_key_rotation,
    sign_manifest,
    verify_manifest,
)
from hivemind.models import ObjectKind, OutputVisibility, Stage, StageUsage, Visibility
from hivemind.policy import parse_policy, policy_hash, public_view
from hivemind.receipt import ReceiptAgent, ReceiptExpectations, sign_receipt, verify_receipt
from hivemind.seal import SealContext, open_bytes, seal_bytes
from hivemind.store import Store
from hivemind.tokens import Secret, TokenKind, random_id
from hivemind.trust import RunnerTrust, RunnerTrustMode
from hivemind_runner.outputs import RunnerIdentity, build_receipt, seal_and_store_outputs
from hivemind_runner.sandbox.base import PreparedAgent, SandboxSpec
from hivemind_runner.scoped import ItemInfo, RoomItem, SqlRejected, build_scoped_database, simulate

REPO = Path(__file__).resolve().parents[2]
RUNNER_SOURCES = REPO / "agent-runner" / "hivemind_runner"

PEOPLE_CSV = (
    b"name,department,salary,region,email\n"
    + b"".join(
        f"Person{i:02d},{'eng' if i % 2 else 'ops'},{50_000 + i},{'eu' if i < 14 else 'us'},"
        f"p{i}@corp.example\n".encode()
        for i in range(20)
    )
    + b"Zed Canary,eng,999999,us,zed.canary@corp.example\n"
)
PEOPLE_POLICY = {
    "tables": {"people": {"columns": ["department", "salary"], "where": "region = 'eu'"}},
    "aggregate": {"required": True, "min_group_size": 3, "functions": ["COUNT", "AVG"]},
    "max_rows": 50,
    "items": {"allow": [], "redact": ["Zed\\s+Canary"]},
    "output": {"deny": ["(?i)zed"], "redact": ["[\\w.+-]+@[\\w-]+\\.[a-z]{2,}"]},
}


def _people_items() -> list[RoomItem]:
    info = ItemInfo(
        id="item_people",
        name="people.csv",
        content_type="text/csv",
        size=len(PEOPLE_CSV),
        metadata={"table": "people"},
    )
    return [RoomItem.from_bytes(info, PEOPLE_CSV)]


# --- 1 ---------------------------------------------------------------------------------------------


def test_property_01_runner_enforces_trust(store: Store, tmp_path: Path) -> None:
    """A runner whose own compose hash the room does not allow refuses the run before it touches a key:
    no nonce spent, no DEK unwrapped, a signed failed receipt with compose_hash_not_trusted."""
    outcome = untrusted_runner_run(store, tmp_path)
    assert outcome.status == "failed"
    assert outcome.error_code == "compose_hash_not_trusted"
    assert outcome.receipt_error_code == "compose_hash_not_trusted"
    assert outcome.nonces_spent == 0
    assert outcome.pipeline_calls == 0


# --- 2 ---------------------------------------------------------------------------------------------


def test_property_02_keys_are_bound_into_the_quote(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client uses the keys of a document whose quote binds them, and verifies receipts under the
    attested key only: a key fetched on the side (swapped in the document, or a receipt's own signer_pub)
    is refused."""
    sign_key = Ed25519PrivateKey.generate()
    keys = HpkeKeyPair.generate()
    document = tdx_document(keys, b64encode(public_bytes(sign_key)), "c0" * 32)
    quote = genuine_quote_for(document)
    monkeypatch.setattr(attestation_module, "verify_quote", lambda *_, now: quote)
    trust = RunnerTrust(mode=RunnerTrustMode.OWNER_APPROVED, allowed_compose_hashes=["c0" * 32])
    verified = verify_attestation(
        document, collateral=AnyCollateral(), now=1, trust=trust, allow_simulated=False
    )
    assert verified.hpke_public_keys == keys.public_keys().by_suite()
    assert verified.sign_pub == document.sign_pub

    side_keys = HpkeKeyPair.generate().public_keys().by_suite()
    for swapped in (
        document.model_copy(update={"hpke_public_keys": side_keys}),
        document.model_copy(update={"sign_pub": b64encode(public_bytes(Ed25519PrivateKey.generate()))}),
    ):
        with pytest.raises(ReportDataMismatch):
            verify_attestation(swapped, collateral=AnyCollateral(), now=1, trust=trust, allow_simulated=False)

    from test_tamper_matrix import _expected, _receipt  # noqa: PLC0415 - the matrix's receipt builder

    impostor = Ed25519PrivateKey.generate()
    forged = sign_receipt(_receipt(signer_pub=b64encode(public_bytes(impostor))), impostor)
    with pytest.raises(ReceiptError):
        verify_receipt(forged, attested_sign_pub=verified.sign_pub, expected=_expected())


# --- 3 ---------------------------------------------------------------------------------------------


def test_property_03_receipts_cover_everything_that_shaped_the_output(store: Store, tmp_path: Path) -> None:
    """The receipt the runner builds names every stage's agent with its source and image digests (the
    mediator too), the scope policy hash, the output and every artifact's hashes; changing any of them
    after signing breaks the signature (the field edits are in test_tamper_matrix)."""

    owner = Tenant.create(store, "owner")
    refs = {
        stage: AgentRef(
            agent_id=f"agent_{stage.value}", digest=f"{index:02x}" * 32, visibility=Visibility.INSPECTABLE
        )
        for index, stage in enumerate((Stage.SCOPE, Stage.QUERY, Stage.MEDIATOR), start=1)
    }
    manifest: RoomManifest = build_manifest(
        owner,
        room_id="room_receipt1",
        scope=refs[Stage.SCOPE],
        query=refs[Stage.QUERY],
        mediator=refs[Stage.MEDIATOR],
        compose_hashes=["c0" * 32],
        output=OutputVisibility.QUERIER_ONLY,
        artifacts=True,
    )
    artifact = tmp_path / "chart.csv"
    artifact.write_bytes(b"department,avg\neng,1\n")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    run_id = random_id("run")
    stored = seal_and_store_outputs(
        store,
        run_id=run_id,
        manifest=manifest,
        reply_pub=public_bytes(owner.box_key),
        output=b"average salary: 50,007",
        artifacts={"chart.csv": artifact},
        scratch=scratch,
    )
    agents = [
        ReceiptAgent(
            stage=stage, agent_id=ref.agent_id, source_digest=ref.digest, image_digest="sha256:" + "9" * 64
        )
        for stage, ref in refs.items()
    ]
    sign_key = Ed25519PrivateKey.generate()
    policy = parse_policy(PEOPLE_POLICY)
    receipt = build_receipt(
        run_id=run_id,
        room_id=manifest.room_id,
        manifest_hash="ab" * 32,
        prompt_sha256="cd" * 32,
        runner=RunnerIdentity(compose_hash="c0" * 32, quote_sha256="ef" * 32),
        signer_pub=b64encode(public_bytes(sign_key)),
        agents=agents,
        scope_policy_hash=policy_hash(policy),
        outputs=stored,
        error_code=None,
        usage=[StageUsage(stage=Stage.QUERY, duration_ms=10)],
        started_at=1,
        finished_at=2,
    )
    signed = sign_receipt(receipt, sign_key)
    covered = json.loads(signed.receipt.signing_bytes().split(b"\n", 1)[1])
    assert [(a["stage"], a["source_digest"], a["image_digest"]) for a in covered["agents"]] == [
        (stage.value, ref.digest, "sha256:" + "9" * 64) for stage, ref in refs.items()
    ]
    assert covered["scope_policy_hash"] == policy_hash(policy)
    assert covered["artifacts"] == [a.model_dump(mode="json") for a in stored.artifacts]
    assert covered["output"]["ciphertext_sha256"] == stored.output.ciphertext_sha256
    expected = ReceiptExpectations(
        run_id=run_id,
        room_id=manifest.room_id,
        manifest_hash="ab" * 32,
        prompt_sha256="cd" * 32,
        output_ciphertext_sha256=stored.output.ciphertext_sha256,
        output_plaintext_sha256=stored.output.plaintext_sha256,
        allowed_compose_hashes=frozenset({"c0" * 32}),
    )
    verify_receipt(signed, attested_sign_pub=receipt.signer_pub, expected=expected)
    dropped_mediator = signed.model_copy(
        update={"receipt": receipt.model_copy(update={"agents": agents[:2]})}
    )
    with pytest.raises(ReceiptError):
        verify_receipt(dropped_mediator, attested_sign_pub=receipt.signer_pub, expected=expected)


# --- 4 ---------------------------------------------------------------------------------------------

_CODE_AS_POLICY: list[Any] = [
    "import os; os.system('id')",
    "__import__('os').system('id')",
    b"\x80\x04\x95\x1f\x00\x00\x00\x00\x00\x00\x00\x8c\x05posix\x94\x8c\x06system\x94\x93\x94.",  # pickle
    "!!python/object/apply:os.system ['id']",
    {"tables": {}, "__class__": "os.system"},
    {"tables": {"people": {"columns": ["department"], "where": "1=1; DROP TABLE people"}}},
    {"tables": {"people": {"columns": ["department"], "where": "load_extension('x')"}}},
    {"tables": {"people": {"columns": ["department"], "where": "region IN (SELECT region FROM people)"}}},
    {"output": {"deny": ["(a+)+$"]}},
]

# Calls that would run agent-supplied code or data as code inside the runner process.
_FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__", "import_module", "loads", "load", "run_path"}
_FORBIDDEN_MODULES = {"pickle", "marshal", "shelve", "dill", "cloudpickle", "runpy"}


@pytest.mark.parametrize("candidate", _CODE_AS_POLICY, ids=range(len(_CODE_AS_POLICY)))
def test_property_04_scope_is_declarative_data_never_code(candidate: Any) -> None:
    with pytest.raises(InvalidPolicy):
        parse_policy(candidate)


def test_property_04_runner_process_never_executes_agent_supplied_code() -> None:
    """Static check of the runner package: no eval/exec/compile, no unpickling, no dynamic imports, no
    unsafe YAML. Agents run only in sandboxes; what they send back is parsed as JSON models."""
    problems: list[str] = []
    for path in sorted(RUNNER_SOURCES.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
                problems += [
                    f"{path.name}: imports {n}" for n in names if n.split(".")[0] in _FORBIDDEN_MODULES
                ]
            if isinstance(node, ast.Call):
                func = node.func
                name = (
                    func.id
                    if isinstance(func, ast.Name)
                    else func.attr
                    if isinstance(func, ast.Attribute)
                    else ""
                )
                owner = (
                    func.value.id
                    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                    else ""
                )
                if isinstance(func, ast.Name) and name in {"eval", "exec", "compile", "__import__"}:
                    problems.append(f"{path.name}:{node.lineno}: {name}()")
                if name in {"import_module", "run_path"}:
                    problems.append(f"{path.name}:{node.lineno}: {name}()")
                if name in {"load", "loads"} and owner in {"pickle", "marshal", "yaml"}:
                    problems.append(f"{path.name}:{node.lineno}: {owner}.{name}()")
    assert problems == []
    assert _FORBIDDEN_CALLS >= {"eval", "exec"}


# --- 5 and 6 ---------------------------------------------------------------------------------------


def test_property_05_query_agent_gets_neither_filters_nor_redaction_lists() -> None:
    policy = parse_policy(PEOPLE_POLICY)
    with build_scoped_database(_people_items(), policy) as database:
        schema = database.schema(role=Stage.QUERY)
    shown = json.dumps(schema.model_dump(mode="json")) + json.dumps(
        public_view(policy).model_dump(mode="json")
    )
    for hidden in (
        "region",
        "'eu'",
        "Zed",
        "(?i)zed",
        "REDACTED",
        "[\\\\w",
        "email",
        "where",
        "deny",
        "redact",
    ):
        assert hidden not in shown, hidden
    assert [table.name for table in schema.tables] == ["people"]
    assert [column.name for column in schema.tables[0].columns] == ["department", "salary"]


def test_property_06_query_database_holds_only_the_allowed_projection() -> None:
    policy = parse_policy(PEOPLE_POLICY)
    with build_scoped_database(_people_items(), policy) as database:
        image = database.snapshot()
        for hidden in (b"Zed", b"Canary", b"999999", b"corp.example", b"Person", b"us"):
            assert hidden not in image, hidden
        # A hidden column is not behind a parser: it does not exist.
        with pytest.raises(SqlRejected) as refused:
            database.query("SELECT region, COUNT(*) FROM people GROUP BY region", role=Stage.QUERY)
        assert "region" in str(refused.value)
        result = database.query("SELECT COUNT(*) AS n FROM people", role=Stage.QUERY)
        assert result.rows == [[14]]  # only the EU rows were loaded


# --- 7 ---------------------------------------------------------------------------------------------


def test_property_07_simulation_runs_real_scoped_sql() -> None:
    room_policy = parse_policy(PEOPLE_POLICY)
    narrower = {**PEOPLE_POLICY, "tables": {"people": {"columns": ["department"], "where": "region = 'eu'"}}}

    def query_agent(database: Any) -> Any:
        answer = database.query(
            "SELECT department, COUNT(*) AS n FROM people GROUP BY department ORDER BY department",
            role=Stage.QUERY,
        )
        with pytest.raises(SqlRejected):
            database.query("SELECT department, AVG(salary) FROM people GROUP BY department", role=Stage.QUERY)
        return answer.rows

    assert simulate(narrower, query_agent, items=_people_items(), room_policy=room_policy) == [
        ["eng", 7],
        ["ops", 7],
    ]
    wider = {**PEOPLE_POLICY, "tables": {"people": {"columns": ["department", "salary", "name"]}}}
    with pytest.raises(InvalidPolicy):
        simulate(wider, query_agent, items=_people_items(), room_policy=room_policy)


# --- 8 ---------------------------------------------------------------------------------------------


def test_property_08_derived_invites_narrow_and_revoke_one_by_one(hm_lambda: Any) -> None:
    hm = hm_lambda
    alice = hm.tenant("alice")
    room = hm.room(alice)
    parent = hm.invite(
        room, uses=5, budgets={"timeout_s": 300, "llm_calls": 10, "tokens": 1000, "memory_mb": 512}
    )
    child = hm.invite(room, by=parent, uses=2)
    sibling = hm.invite(room, by=parent, uses=1)
    grandchild = hm.invite(room, by=child, uses=1)
    for holder in (parent, child, sibling, grandchild):
        served = hm.api.get(f"/v1/rooms/{room.room_id}/key", token=holder.token).ok()
        assert (
            unwrap_dek(
                __import__("hivemind.keys", fromlist=["wrap_key"]).wrap_key(holder.secret, room.room_id),
                served["wrapped"],
                room_id=room.room_id,
                bearer_id=holder.invite_id,
            )
            == room.dek
        )
    widen = hm.invite_key(room, parent=child)
    for constraints in (
        {"uses": 3},
        {"budgets": {"timeout_s": 301, "llm_calls": 1, "tokens": 1, "memory_mb": 64}},
    ):
        body = hm.invite_body(widen, room.dek, **constraints)
        refused = hm.api.post(f"/v1/rooms/{room.room_id}/invites", token=child.token, json=body)
        assert (refused.status, refused.error) == (403, "invite_widens")
    revoked = hm.api.delete(f"/v1/rooms/{room.room_id}/invites/{child.invite_id}", token=parent.token).ok()
    assert sorted(revoked["revoked"]) == sorted([child.invite_id, grandchild.invite_id])
    for holder, status in ((parent, 200), (sibling, 200), (child, 401), (grandchild, 401)):
        assert hm.api.get(f"/v1/rooms/{room.room_id}", token=holder.token).status == status


# --- 9 ---------------------------------------------------------------------------------------------


def test_property_09_holds_are_atomic_and_never_free(store: Store) -> None:
    tenant = random_id("tenant")
    store.billing.grant(tenant, 4_000)
    outcomes: list[str] = []
    lock = threading.Lock()

    def take(index: int) -> None:
        try:
            store.billing.hold(tenant, f"run_race{index}", 1_000, enforce=True)
            result = "held"
        except InsufficientCredit:
            result = "refused"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=take, args=(index,)) for index in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes).count("held") == 4
    account = store.billing.account(tenant)
    assert account.held == 4_000 and account.balance - account.held == 0
    with pytest.raises(HivemindError) as over:
        store.billing.settle(_held_run(store), 1_001)
    assert over.value.code == "charge_exceeds_hold"
    with pytest.raises(HivemindError) as unpriced:
        store.prices.hold_for(providers=["nobody-sells-this"], token_budget=1000, timeout_s=60)
    assert unpriced.value.code == "price_missing"
    assert store.billing.verify(tenant) >= 5


def _held_run(store: Store) -> str:
    return next(f"run_race{i}" for i in range(12) if store.billing.get_hold(f"run_race{i}") is not None)


# --- 10 --------------------------------------------------------------------------------------------


def test_property_10_sandboxes_have_no_network_and_no_content_in_env_or_argv(tmp_path: Path) -> None:
    """The contract: a sandbox spec carries no prompt, data or output at all, the environment is exactly
    the bridge's address, the session token and the role, and Docker gets ``network_mode=none``. The
    live probes (no interface but lo, connect/DNS refused, prompt absent from /proc/*/environ and every
    host command line) run on both backends in tests/runner/test_sandbox.py."""
    from hivemind_runner.sandbox.docker_backend import DockerBackend  # noqa: PLC0415

    content_words = {"prompt", "data", "items", "output", "answer", "rules", "policy", "input"}
    assert not content_words & set(SandboxSpec.model_fields)
    spec = SandboxSpec(
        agent=PreparedAgent(
            backend="docker", source_digest="ab" * 32, image_digest="sha256:" + "cd" * 32, reference="x"
        ),
        role=Stage.QUERY,
        bridge_socket=tmp_path / "bridge.sock",
        session_token="tok_" + "a" * 40,
        timeout_s=30,
    )
    assert set(spec.environment()) == {
        "HIVEMIND_BRIDGE",
        "HIVEMIND_SESSION",
        "HIVEMIND_ROLE",
        "PATH",
        "HOME",
        "LANG",
        "PYTHONDONTWRITEBYTECODE",
    }
    options = DockerBackend._container_options(object.__new__(DockerBackend), spec)
    assert options["network_mode"] == "none"
    assert options["cap_drop"] == ["ALL"] and options["read_only"] is True
    assert [mount["Target"] for mount in options["mounts"]] == ["/run/hivemind/bridge.sock"]


# --- 11 --------------------------------------------------------------------------------------------


def test_property_11_key_rotation_keeps_rooms_wraps_and_manifests_working(hm_lambda: Any) -> None:
    hm = hm_lambda
    alice = hm.tenant("alice")
    room = hm.room(alice)
    invite = hm.invite(room)
    new = Secret.generate(TokenKind.TENANT)
    from hivemind.keys import auth_hash, owner_box_key, owner_sign_key, wrap_key  # noqa: PLC0415

    certificate = sign_key_rotation(
        KeyRotation(
            tenant_id=alice.tenant_id,
            old_sign_pub=alice.sign_pub,
            new_sign_pub=b64encode(public_bytes(owner_sign_key(new))),
            new_box_pub=b64encode(public_bytes(owner_box_key(new))),
            rotated_at=hm.store.clock(),
        ),
        alice.sign_key,
    )
    resigned = sign_manifest(rotated_revision(room.manifest, certificate.rotation), owner_sign_key(new))
    body = {
        "new_auth_hash": auth_hash(new),
        "rotation": certificate.model_dump(mode="json"),
        "rooms": [
            {
                "room_id": room.room_id,
                "signed_manifest": resigned.model_dump(mode="json"),
                "owner_wrap": wrap_dek(
                    wrap_key(new, room.room_id), room.dek, room_id=room.room_id, bearer_id=alice.tenant_id
                ),
            }
        ],
    }
    hm.api.post("/v1/tenant/key-rotation", token=alice.token, json=body).ok()
    from hivemind.keys import auth_token  # noqa: PLC0415

    assert hm.api.get("/v1/whoami", token=alice.token).status == 401
    served = hm.api.get(f"/v1/rooms/{room.room_id}", token=auth_token(new)).ok()
    # A participant who pinned the OLD owner key follows the certificate to the new one.
    verify_manifest(
        SignedManifest.model_validate(served["signed_manifest"]),
        expected_owner_sign_pub=alice.sign_pub,
        expected_room_id=room.room_id,
        min_revision=1,
        rotations=[certificate],
    )
    wrap = hm.api.get(f"/v1/rooms/{room.room_id}/key", token=auth_token(new)).ok()
    assert (
        unwrap_dek(
            wrap_key(new, room.room_id), wrap["wrapped"], room_id=room.room_id, bearer_id=alice.tenant_id
        )
        == room.dek
    )
    assert hm.api.get(f"/v1/rooms/{room.room_id}", token=invite.token).status == 200


# --- 12 --------------------------------------------------------------------------------------------


def test_property_12_signed_json_holds_no_floats(hm_lambda: Any) -> None:
    hm = hm_lambda
    alice = hm.tenant("alice")
    room = hm.room(alice)
    with pytest.raises(FloatInSignedDocument):
        canonical_json({"created_at": 1_700_000_000.0})
    envelope = room.signed.model_dump(mode="json")
    envelope["manifest"]["created_at"] = float(envelope["manifest"]["created_at"])
    text = json.dumps(envelope)
    assert ".0" in text
    with pytest.raises((ManifestError, InvalidInput)):
        verify_manifest(
            SignedManifest.from_json(text),
            expected_owner_sign_pub=alice.sign_pub,
            expected_room_id=room.room_id,
            min_revision=1,
        )
    fresh = hm.sign(alice, hm.manifest(alice, scope=room.agents["scope"])).model_dump(mode="json")
    fresh["manifest"]["created_at"] = float(fresh["manifest"]["created_at"])
    body = json.dumps(
        {"signed_manifest": fresh, "owner_wrap": alice.wrap(fresh["manifest"]["room_id"], new_dek())}
    )
    before = hm.api.get("/v1/rooms", token=alice.token).ok()["rooms"]
    refused = hm.api.post(
        "/v1/rooms", token=alice.token, content=body.encode(), headers={"content-type": "application/json"}
    )
    assert refused.status == 400, refused.body[:300]
    assert hm.api.get("/v1/rooms", token=alice.token).ok()["rooms"] == before
    from test_tamper_matrix import RUNNER_SIGN, _receipt  # noqa: PLC0415

    receipt_text = (
        sign_receipt(_receipt(), RUNNER_SIGN)
        .to_json()
        .replace('"started_at":1700000000', '"started_at":1700000000.0')
    )
    with pytest.raises((ReceiptError, FloatInSignedDocument)):
        __import__("hivemind.receipt", fromlist=["SignedReceipt"]).SignedReceipt.from_json(receipt_text)
    entry = next(iter(hm.store.billing.entries(_granted(hm.store))))
    canonical_json(entry.hashed_fields())  # what the chain hashes: integers only
    with pytest.raises(FloatInSignedDocument):
        entry_hash(entry.prev_hash, {**entry.hashed_fields(), "amount": float(entry.amount)})


def _granted(store: Store) -> str:
    tenant = random_id("tenant")
    store.billing.grant(tenant, 10)
    return tenant


# --- 13 --------------------------------------------------------------------------------------------


def test_property_13_secret_files_are_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hivemind_runner.tee import SimulatedTee  # noqa: PLC0415
    from hmctl.profiles import Profile, ProfileStore  # noqa: PLC0415

    monkeypatch.setattr(os, "umask", os.umask)  # the process umask is left as the test found it
    previous = os.umask(0o000)  # the most permissive umask: files must still come out private
    try:
        profiles = ProfileStore(tmp_path / "config", tmp_path / "cache")
        profiles.save(
            Profile(
                name="owner", service="http://127.0.0.1:8700", key=Secret.generate(TokenKind.TENANT).token()
            ),
            make_current=True,
        )
        profiles.accepted("owner")
        seed_path = tmp_path / "runner" / "seed"
        SimulatedTee(seed_path, compose_hash="c0" * 32).seed()
    finally:
        os.umask(previous)
    secret_files = [profiles.path, seed_path]
    for path in secret_files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0, path.parent
    for path in (tmp_path / "config").rglob("*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, (path, oct(mode))


# --- 14 --------------------------------------------------------------------------------------------


def test_property_14_every_wrap_and_sealed_object_is_bound_to_its_place() -> None:
    dek, key = new_dek(), os.urandom(32)
    wrapped = wrap_dek(key, dek, room_id="room_a", bearer_id="tenant_a")
    for room_id, bearer_id in (
        ("room_b", "tenant_a"),
        ("room_a", "tenant_b"),
        ("room_a", "0123456789abcdef"),
    ):
        with pytest.raises(WrapError):
            unwrap_dek(key, wrapped, room_id=room_id, bearer_id=bearer_id)
    assert unwrap_dek(key, wrapped, room_id="room_a", bearer_id="tenant_a") == dek

    base = {"tenant_id": "tenant_a", "room_id": "room_a", "kind": ObjectKind.ITEM, "object_id": "item_a"}
    blob = seal_bytes(b"bound", key=dek, context=SealContext(**base))
    moves = {"tenant_id": "tenant_b", "room_id": "room_b", "object_id": "item_b"}
    moved = [SealContext(**{**base, field: value}) for field, value in moves.items()]
    moved += [SealContext(**{**base, "kind": kind}) for kind in ObjectKind if kind is not ObjectKind.ITEM]
    for context in moved:
        with pytest.raises(SealError):
            open_bytes(blob, key=dek, context=context)
    assert open_bytes(blob, key=dek, context=SealContext(**base)) == b"bound"
    assert len(moved) == 3 + len(ObjectKind) - 1
