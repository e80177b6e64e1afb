"""A malicious control plane or runner is refused by ``hmctl``, each case with its own message and exit code.

The fake service plays the attacker: it changes the manifest it serves, signs a receipt with a key that
is not the attested one, serves an output whose hash the receipt does not vouch for, or offers a
simulated runner for a service that is not on this machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hmctl_fakes import FakeService
from hmctl_harness import Cli, accepted_room

from hivemind.attestation import PcsCollateralProvider
from hivemind.canonical import canonical_sha256
from hivemind.encoding import b64encode
from hivemind.keys import public_bytes
from hivemind.manifest import RoomManifest, rules_digest, sign_manifest
from hivemind.models import TeeKind


def test_a_modified_manifest_is_refused(
    cli: Cli, fake: FakeService, agent_dir: Path, rules_file: Path
) -> None:
    link = accepted_room(cli, agent_dir, rules_file)

    def loosen_rules(signed: dict[str, Any]) -> dict[str, Any]:
        signed["manifest"]["rules"] = "Anything goes."
        return signed

    fake.tamper_manifest = loosen_rules
    refused = cli.run("--profile", "bob", "room", "ask", link, "q", "--json")
    assert refused.exit_code == 5, repr(refused)
    assert "manifest_invalid" in refused.stderr and "rules_sha256 is not the SHA-256" in refused.stderr

    def loosen_rules_consistently(signed: dict[str, Any]) -> dict[str, Any]:
        signed["manifest"]["rules"] = "Anything goes."
        signed["manifest"]["rules_sha256"] = rules_digest("Anything goes.")
        return signed

    fake.tamper_manifest = loosen_rules_consistently
    refused = cli.run("--profile", "bob", "room", "ask", link, "q", "--json")
    assert refused.exit_code == 5, repr(refused)
    assert "manifest hash mismatch" in refused.stderr


def test_a_rehashed_but_unsigned_manifest_is_refused(
    cli: Cli, fake: FakeService, agent_dir: Path, rules_file: Path
) -> None:
    link = accepted_room(cli, agent_dir, rules_file)

    def rehash(signed: dict[str, Any]) -> dict[str, Any]:
        signed["manifest"]["egress"]["llm_providers"] = ["exfil"]
        signed["manifest_hash"] = canonical_sha256(signed["manifest"])
        return signed

    fake.tamper_manifest = rehash
    refused = cli.run("--profile", "bob", "room", "ask", link, "q")
    assert refused.exit_code == 5, repr(refused)
    assert (
        "signature_invalid" in refused.stderr and "does not verify under its owner_sign_pub" in refused.stderr
    )


def test_a_manifest_signed_by_another_key_is_refused(
    cli: Cli, fake: FakeService, agent_dir: Path, rules_file: Path
) -> None:
    link = accepted_room(cli, agent_dir, rules_file)
    attacker = Ed25519PrivateKey.generate()

    def substitute(signed: dict[str, Any]) -> dict[str, Any]:
        manifest = RoomManifest.model_validate(
            {**signed["manifest"], "owner_sign_pub": b64encode(public_bytes(attacker))}
        )
        return sign_manifest(manifest, attacker).model_dump(mode="json")

    fake.tamper_manifest = substitute
    refused = cli.run("--profile", "bob", "room", "ask", link, "q")
    assert refused.exit_code == 5, repr(refused)
    assert "refusing a substituted manifest" in refused.stderr


def test_a_receipt_signed_by_another_key_is_refused(
    cli: Cli, fake: FakeService, agent_dir: Path, rules_file: Path
) -> None:
    link = accepted_room(cli, agent_dir, rules_file)
    fake.receipt_signer = Ed25519PrivateKey.generate()
    refused = cli.run("--profile", "bob", "room", "ask", link, "q", "--json")
    assert refused.exit_code == 5, repr(refused)
    assert "receipt signature: does not verify under the attested runner key" in refused.stderr
    body = refused.json()
    assert body["verified"] is False and body["output"] is None and body["error"] == "receipt_invalid"


def test_an_output_whose_hash_does_not_match_is_refused(
    cli: Cli, fake: FakeService, agent_dir: Path, rules_file: Path
) -> None:
    link = accepted_room(cli, agent_dir, rules_file)
    fake.corrupt_output = True
    refused = cli.run("--profile", "bob", "room", "ask", link, "q", "--json")
    assert refused.exit_code == 5, repr(refused)
    assert "receipt output.ciphertext_sha256" in refused.stderr
    assert "something else" not in refused.stdout  # nothing unverified is printed


def test_a_simulated_runner_is_refused_for_a_remote_service(
    config_dir: Path, agent_dir: Path, rules_file: Path
) -> None:
    remote = FakeService(service="https://hivemind.example.com")
    cli = Cli.for_service(remote)
    cli.signup("owner")
    refused = cli.run(
        "--profile",
        "owner",
        "room",
        "create",
        str(agent_dir),
        "--name",
        "R",
        "--rules-file",
        str(rules_file),
        "--query-agent",
        str(agent_dir),
    )
    assert refused.exit_code == 2, repr(refused)
    assert "no runner verified" in refused.stderr and "simulated" in refused.stderr
    # With the build named explicitly the room is made; asking still refuses the simulated runner.
    room = cli.ok(
        "--profile",
        "owner",
        "room",
        "create",
        str(agent_dir),
        "--name",
        "R",
        "--rules-file",
        str(rules_file),
        "--query-agent",
        str(agent_dir),
        "--trust-compose",
        remote.document.compose_hash,
        "--json",
    )
    cli.signup("bob")
    cli.ok("--profile", "bob", "room", "accept", room["link"], input="y\n")
    refused = cli.run("--profile", "bob", "room", "ask", room["link"], "q")
    assert refused.exit_code == 5, repr(refused)
    assert (
        "simulated_tee_refused" in refused.stderr and "hmctl profile set --allow-simulated" in refused.stderr
    )
    # The loud way around it works, says so on stderr and in the JSON.
    skipped = cli.ok(
        "--profile", "bob", "room", "ask", room["link"], "q", "--dangerously-skip-attestations", "--json"
    )
    assert skipped["attestation_skipped"] is True
    danger = cli.run("--profile", "bob", "room", "ask", room["link"], "q", "--dangerously-skip-attestations")
    assert "DANGER" in danger.stderr and "NOT verified" in danger.stderr


def test_an_untrusted_runner_build_is_refused(
    cli: Cli, fake: FakeService, agent_dir: Path, rules_file: Path
) -> None:
    link = accepted_room(cli, agent_dir, rules_file)
    other = fake.document.model_copy(update={"compose_hash": "ee" * 32})
    fake.runner_documents = [{"runner_id": other.runner_id, "document": other.model_dump(mode="json")}]
    refused = cli.run("--profile", "bob", "room", "ask", link, "q", "--json")
    assert refused.exit_code == 5, repr(refused)
    assert "compose_hash_not_trusted" in refused.stderr
    body = refused.json()
    assert (body["run_id"], body["verified"], body["error"], body["exit_code"]) == (
        None,
        False,
        "compose_hash_not_trusted",
        5,
    )
    assert fake.runs == {}  # nothing was sealed or sent


def test_a_rolled_back_manifest_is_refused(
    cli: Cli, fake: FakeService, agent_dir: Path, rules_file: Path
) -> None:
    link = accepted_room(cli, agent_dir, rules_file)
    room = next(iter(fake.rooms.values()))
    first = dict(room.signed)
    cli.ok("--profile", "owner", "room", "trust", room.room_id, "--add", "d1" * 32, "--json")
    cli.ok("--profile", "bob", "room", "accept", link, input="y\n")
    room.signed = first  # the service serves the old revision again
    refused = cli.run("--profile", "bob", "room", "ask", link, "q")
    assert refused.exit_code == 5, repr(refused)
    assert "manifest_rollback" in refused.stderr


@pytest.mark.parametrize("tee", [TeeKind.SIMULATED])
def test_a_malformed_attestation_document_is_reported(
    cli: Cli, fake: FakeService, agent_dir: Path, rules_file: Path, tee: TeeKind
) -> None:
    link = accepted_room(cli, agent_dir, rules_file)
    fake.runner_documents = [
        {"runner_id": "runner_bad", "document": {"runner_id": "runner_bad", "tee": tee.value}}
    ]
    refused = cli.run("--profile", "bob", "room", "ask", link, "q")
    assert refused.exit_code == 5, repr(refused)
    assert "malformed attestation document" in refused.stderr


VECTORS = Path(__file__).resolve().parents[3] / "shared" / "test-vectors" / "tdx"
GOOD_AT = 1750377600  # the real quote and its collateral verify at this time (shared/test-vectors/tdx)


def _tdx_document(fake: FakeService, quote: bytes) -> dict[str, Any]:
    """A TDX runner document carrying a genuine Intel-signed quote that was not made for these keys."""
    compose = fake.document.compose_hash
    payloads = [
        ("app-id", bytes.fromhex("ab" * 20)),
        ("compose-hash", bytes.fromhex(compose)),
        ("system-ready", b""),
    ]
    events = [
        {"imr": 3, "event_type": 0x08000001, "digest": "", "event": name, "event_payload": payload.hex()}
        for name, payload in payloads
    ]
    document = fake.document.model_dump(mode="json")
    document.update(tee="tdx", app_id="ab" * 20, quote=quote.hex(), event_log=events, instance_id=None)
    return {"runner_id": document["runner_id"], "document": document}


@pytest.fixture
def tdx_quote() -> bytes:
    if not VECTORS.is_dir():
        pytest.skip(f"the real TDX quote vectors are not at {VECTORS}")
    return (VECTORS / "tdx_quote").read_bytes()


def test_a_genuine_quote_that_does_not_bind_the_published_keys_is_refused(
    cli: Cli, fake: FakeService, config_dir: Path, tdx_quote: bytes
) -> None:
    """DCAP verification passes (real Intel chain, cached collateral); the keys are not the quote's."""
    cli.signup("owner")
    fake.runner_documents = [_tdx_document(fake, tdx_quote)]
    cli.clock = lambda: GOOD_AT
    provider = PcsCollateralProvider(cli.store.collateral_dir)
    cache = provider._cache_path(tdx_quote)
    cache.parent.mkdir(parents=True, mode=0o700)
    cache.write_text((VECTORS / "tdx_quote_collateral.json").read_text())
    refused = cli.run("--profile", "owner", "trust", "attest", "--json")
    assert refused.exit_code == 5, repr(refused)
    (runner,) = refused.json()["runners"]
    assert runner["error"] == "report_data_mismatch" and runner["tee"] == "tdx"


def test_a_tdx_runner_without_collateral_is_refused(cli: Cli, fake: FakeService, tdx_quote: bytes) -> None:
    cli.signup("owner")
    cli.ok("--profile", "owner", "profile", "set", "--pccs-url", "http://127.0.0.1:9")
    fake.runner_documents = [_tdx_document(fake, tdx_quote)]
    refused = cli.run("--profile", "owner", "trust", "attest", "--json")
    assert refused.exit_code == 5, repr(refused)
    assert refused.json()["runners"][0]["error"] == "collateral_unavailable"
