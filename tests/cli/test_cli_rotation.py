"""``hmctl tenant rotate-key`` keeps every room, wrap, manifest and link working (DESIGN §16.11)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hmctl_fakes import FakeService
from hmctl_harness import Cli, make_room

from hivemind.encoding import b64encode
from hivemind.keys import auth_hash, credential_id, owner_sign_key, public_bytes
from hivemind.manifest import KeyRotation, SignedKeyRotation, SignedManifest, rotated_revision, sign_manifest
from hivemind.tokens import Secret
from hmctl.profiles import Profile, ProfileStore


@pytest.fixture
def rotated_world(
    cli: Cli, fake: FakeService, agent_dir: Path, rules_file: Path, tmp_path: Path
) -> dict[str, Any]:
    """A room with data (outputs shown to the owner too), bob's accepted link and one answered run."""
    cli.signup("owner")
    room = make_room(cli, agent_dir, rules_file, "--output-visibility", "owner_and_querier")
    first = tmp_path / "first.csv"
    first.write_text("a\n1\n")
    cli.ok("--profile", "owner", "room", "add-data", room["room_id"], "--file", str(first), "--json")
    cli.signup("bob")
    cli.ok("--profile", "bob", "room", "accept", room["link"], input="y\n")
    before = cli.ok("--profile", "bob", "room", "ask", room["link"], "before", "--json")
    old_key = cli.store.load("owner").key
    return {"room": room, "run_before": before["run_id"], "old_key": old_key}


def test_rotation_keeps_rooms_links_wraps_and_outputs_working(
    cli: Cli, fake: FakeService, rotated_world: dict[str, Any], tmp_path: Path
) -> None:
    room = rotated_world["room"]
    old = Secret.parse(rotated_world["old_key"])
    rotated = cli.ok("--profile", "owner", "tenant", "rotate-key", "-y", "--json")
    assert rotated["rooms"] == [room["room_id"]] and rotated["old_key_id"] == credential_id(old)

    profile = cli.store.load("owner")
    assert profile.key != rotated_world["old_key"] and profile.retired_keys == [rotated_world["old_key"]]
    assert profile.pending_key is None
    assert auth_hash(old) not in fake.credentials  # the old key no longer opens anything
    assert cli.ok("--profile", "owner", "whoami", "--json")["tenant_id"] == profile.tenant_id

    # The room moved to revision 2, signed by the new key; its terms did not change.
    signed = SignedManifest.model_validate(fake.rooms[room["room_id"]].signed)
    assert signed.manifest.revision == 2
    assert signed.manifest.owner_sign_pub == b64encode(public_bytes(owner_sign_key(profile.tenant_secret())))

    # Bob's link still pins the old key: the certificate links it, and he need not accept again.
    after = cli.ok("--profile", "bob", "room", "ask", room["link"], "after", "--json")
    assert after["verified"] is True and json.loads(after["output"])["items"].keys() == {"first.csv"}

    # The owner's new wrap opens the same DEK: new data is readable by the next run.
    second = tmp_path / "second.csv"
    second.write_text("b\n2\n")
    cli.ok("--profile", "owner", "room", "add-data", room["room_id"], "--file", str(second), "--json")
    mine = cli.ok("--profile", "owner", "room", "ask", room["room_id"], "mine", "--json")
    assert json.loads(mine["output"])["items"].keys() == {"first.csv", "second.csv"}

    # Outputs sealed to the owner before the rotation open with the retired key, newer ones with the new.
    assert (
        json.loads(
            cli.ok("--profile", "owner", "run", "output", rotated_world["run_before"], "--json")["output"]
        )["prompt"]
        == "before"
    )
    assert (
        json.loads(cli.ok("--profile", "owner", "run", "output", after["run_id"], "--json")["output"])[
            "prompt"
        ]
        == "after"
    )

    # A link shared after the rotation pins the new key and works for a newcomer.
    link = cli.ok("--profile", "owner", "room", "share", room["room_id"], "--json")["link"]
    cli.signup("carol")
    cli.ok("--profile", "carol", "room", "accept", link, input="y\n")
    assert cli.ok("--profile", "carol", "room", "ask", link, "hello", "--json")["verified"] is True


def test_a_forged_rotation_is_refused(cli: Cli, fake: FakeService, rotated_world: dict[str, Any]) -> None:
    """The service claims the owner rotated to a key it controls: the certificate is not the owner's."""
    room = fake.rooms[rotated_world["room"]["room_id"]]
    current = SignedManifest.model_validate(room.signed).manifest
    attacker = Ed25519PrivateKey.generate()
    rotation = KeyRotation(
        tenant_id=current.tenant_id,
        old_sign_pub=current.owner_sign_pub,
        new_sign_pub=b64encode(public_bytes(attacker)),
        new_box_pub=current.owner_box_pub,
        rotated_at=1,
    )
    forged = SignedKeyRotation(
        rotation=rotation, signature=b64encode(attacker.sign(rotation.signing_bytes()))
    )
    room.signed = sign_manifest(rotated_revision(current, rotation), attacker).model_dump(mode="json")
    fake.rotations[current.tenant_id] = [forged.model_dump(mode="json")]
    refused = cli.run("--profile", "bob", "room", "ask", rotated_world["room"]["link"], "q")
    assert refused.exit_code == 5, repr(refused)
    assert "key_rotation_invalid" in refused.stderr and "does not verify under that key" in refused.stderr


def test_an_interrupted_rotation_resumes_with_the_same_key(
    cli: Cli, fake: FakeService, rotated_world: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    original = ProfileStore.save
    calls = {"final": 0}

    def save_fails_at_the_end(self: ProfileStore, profile: Profile, *, make_current: bool = False) -> None:
        if (
            profile.name == "owner"
            and profile.pending_key is None
            and profile.retired_keys
            and calls["final"] == 0
        ):
            calls["final"] += 1
            raise OSError("disk full")
        original(self, profile, make_current=make_current)

    monkeypatch.setattr(ProfileStore, "save", save_fails_at_the_end)
    crashed = cli.run("--profile", "owner", "tenant", "rotate-key", "-y")
    assert crashed.exit_code == 1, repr(crashed)
    pending = cli.store.load("owner").pending_key
    assert pending is not None and auth_hash(Secret.parse(pending)) in fake.credentials
    resumed = cli.ok("--profile", "owner", "tenant", "rotate-key", "--json")
    assert resumed["resumed"] is True
    profile = cli.store.load("owner")
    assert profile.key == pending and profile.pending_key is None
    assert (
        cli.ok("--profile", "bob", "room", "ask", rotated_world["room"]["link"], "q", "--json")["verified"]
        is True
    )
