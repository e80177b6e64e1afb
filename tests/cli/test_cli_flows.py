"""The owner -> participant story through ``hmctl`` against the fake service (tests/cli/hmctl_fakes.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hmctl_fakes import FakeService
from hmctl_harness import Cli, make_room, write_agent

from hivemind.envelope import SealedEnvelope, open_provider_key
from hivemind.errors import EnvelopeError


def test_owner_to_participant_story(
    cli: Cli, fake: FakeService, agent_dir: Path, rules_file: Path, tmp_path: Path
) -> None:
    owner = cli.signup("owner")
    assert owner["kind"] == "tenant" and owner["tenant_id"].startswith("tn_")
    me = cli.ok("--profile", "owner", "whoami", "--json")
    assert me["tenant_id"] == owner["tenant_id"] and me["kind"] == "tenant"

    room = make_room(cli, agent_dir, rules_file)
    assert set(room) >= {"room_id", "link", "manifest_hash"}
    data = tmp_path / "people.csv"
    data.write_text("name,country\nada,uk\n")
    item = cli.ok(
        "--profile",
        "owner",
        "room",
        "add-data",
        room["room_id"],
        "--file",
        str(data),
        "--meta",
        "k=v",
        "--json",
    )
    assert (
        item["state"] == "committed"
        and item["metadata"]["table"] == "people"
        and item["metadata"]["k"] == "v"
    )
    shared = cli.ok(
        "--profile", "owner", "room", "share", room["room_id"], "--uses", "3", "--expires", "7d", "--json"
    )
    assert shared["link"].startswith("hmroom://") and shared["uses"] == 3

    cli.signup("bob")
    cli.ok("--profile", "bob", "room", "accept", shared["link"], input="y\n")
    answer = cli.ok("--profile", "bob", "room", "ask", shared["link"], "how many?", "--json")
    assert answer["verified"] is True and answer["status"] == "completed"
    assert answer["attestation_skipped"] is False
    assert set(answer) >= {"run_id", "status", "output", "verified", "receipt"}
    output = json.loads(answer["output"])
    assert output["prompt"] == "how many?" and list(output["items"]) == ["people.csv"]
    assert answer["receipt"]["room_id"] == room["room_id"]


@pytest.fixture
def shared_room(cli: Cli, agent_dir: Path, rules_file: Path, tmp_path: Path) -> dict:
    """An owner's room with one item, and a 3-use link for bob (who signed up but accepted nothing)."""
    cli.signup("owner")
    room = make_room(cli, agent_dir, rules_file)
    data = tmp_path / "people.csv"
    data.write_text("name,country\nada,uk\n")
    cli.ok("--profile", "owner", "room", "add-data", room["room_id"], "--file", str(data), "--json")
    shared = cli.ok("--profile", "owner", "room", "share", room["room_id"], "--uses", "3", "--json")
    cli.signup("bob")
    return {**room, "link": shared["link"], "invite_id": shared["invite_id"]}


def test_ask_without_acceptance_names_the_exact_command_and_y_does_not_accept(
    cli: Cli, shared_room: dict
) -> None:
    refused = cli.run("--profile", "bob", "room", "ask", shared_room["link"], "q", "-y", "--json")
    assert refused.exit_code == 9, repr(refused)
    assert "not accepted by this profile" in refused.stderr
    assert "hmctl --profile bob room accept LINK" in refused.stderr
    # -y on accept does not accept either: with nothing on stdin the answer is no.
    declined = cli.run("--profile", "bob", "room", "accept", shared_room["link"], "-y")
    assert declined.exit_code == 9, repr(declined)
    assert "-y does not accept" in declined.stderr
    assert cli.run("--profile", "bob", "room", "ask", shared_room["link"], "q").exit_code == 9


def test_first_ask_prompts_when_interactive(
    cli: Cli, shared_room: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("hmctl.console.stdin_is_interactive", lambda: True)
    declined = cli.run("--profile", "bob", "room", "ask", shared_room["link"], "q", "--json", input="n\n")
    assert declined.exit_code == 9, repr(declined)
    answered = cli.ok("--profile", "bob", "room", "ask", shared_room["link"], "q", "--json", input="y\n")
    assert answered["verified"] is True
    # Accepted once: the next ask asks nothing, and the room id alone now works (the link was kept).
    monkeypatch.setattr("hmctl.console.stdin_is_interactive", lambda: False)
    assert (
        cli.ok("--profile", "bob", "room", "ask", shared_room["room_id"], "q2", "--json")["verified"] is True
    )


def test_accept_with_a_pinned_manifest_hash(cli: Cli, shared_room: dict) -> None:
    wrong = cli.run("--profile", "bob", "room", "accept", shared_room["link"], "--manifest-hash", "ab" * 32)
    assert wrong.exit_code == 9 and "not the one you reviewed" in wrong.stderr
    accepted = cli.ok(
        "--profile",
        "bob",
        "room",
        "accept",
        shared_room["link"],
        "--manifest-hash",
        shared_room["manifest_hash"],
        "--json",
    )
    assert accepted["accepted"] is True and accepted["manifest_hash"] == shared_room["manifest_hash"]


def test_changed_manifest_needs_a_new_acceptance(cli: Cli, shared_room: dict) -> None:
    cli.ok("--profile", "bob", "room", "accept", shared_room["link"], input="y\n")
    updated = cli.ok(
        "--profile", "owner", "room", "trust", shared_room["room_id"], "--add", "d1" * 32, "--json"
    )
    assert updated["revision"] == 2
    refused = cli.run("--profile", "bob", "room", "ask", shared_room["link"], "q")
    assert refused.exit_code == 9 and "changed since you accepted revision 1" in refused.stderr
    cli.ok("--profile", "bob", "room", "accept", shared_room["link"], input="y\n")
    assert cli.ok("--profile", "bob", "room", "ask", shared_room["link"], "q", "--json")["verified"] is True


def test_failed_run_exits_7_with_its_verified_receipt(cli: Cli, fake: FakeService, shared_room: dict) -> None:
    cli.ok("--profile", "bob", "room", "accept", shared_room["link"], input="y\n")
    fake.fail_runs_with = "scope_refused"
    failed = cli.run("--profile", "bob", "room", "ask", shared_room["link"], "q", "--json")
    assert failed.exit_code == 7, repr(failed)
    body = failed.json()
    assert body["status"] == "failed" and body["verified"] is True and body["output"] is None
    assert body["error_code"] == "scope_refused"


def test_owner_cannot_read_a_querier_only_output(cli: Cli, shared_room: dict) -> None:
    cli.ok("--profile", "bob", "room", "accept", shared_room["link"], input="y\n")
    run_id = cli.ok("--profile", "bob", "room", "ask", shared_room["link"], "q", "--json")["run_id"]
    refused = cli.run("--profile", "owner", "run", "output", run_id)
    assert refused.exit_code == 4, repr(refused)
    assert "output_not_visible" in refused.stderr
    # Bob reads it again later with the reply key his profile kept.
    again = cli.ok("--profile", "bob", "run", "output", run_id, "--json")
    assert again["verified"] is True and json.loads(again["output"])["prompt"] == "q"


def test_owner_reads_outputs_of_an_owner_and_querier_room(
    cli: Cli, agent_dir: Path, rules_file: Path
) -> None:
    cli.signup("owner")
    room = make_room(cli, agent_dir, rules_file, "--output-visibility", "owner_and_querier")
    cli.signup("bob")
    cli.ok("--profile", "bob", "room", "accept", room["link"], input="y\n")
    run_id = cli.ok("--profile", "bob", "room", "ask", room["link"], "both see this", "--json")["run_id"]
    seen = cli.ok("--profile", "owner", "run", "output", run_id, "--json")
    assert seen["verified"] is True and json.loads(seen["output"])["prompt"] == "both see this"


def test_derived_invites_only_narrow_and_revocation_cascades(cli: Cli, shared_room: dict) -> None:
    cli.ok("--profile", "bob", "room", "accept", shared_room["link"], input="y\n")
    child = cli.ok("--profile", "bob", "room", "share", shared_room["link"], "--uses", "2", "--json")
    assert child["parent_id"] == shared_room["invite_id"] and child["uses"] == 2
    wider = cli.run("--profile", "bob", "room", "share", shared_room["link"], "--uses", "5")
    assert wider.exit_code == 6, repr(wider)
    assert "may only narrow" in wider.stderr and "--uses 5 > the 3 uses" in wider.stderr
    # The derived link pins the same owner key and works for a third party.
    cli.signup("carol")
    cli.ok("--profile", "carol", "room", "accept", child["link"], input="y\n")
    assert cli.ok("--profile", "carol", "room", "ask", child["link"], "q", "--json")["verified"] is True
    revoked = cli.ok(
        "--profile",
        "owner",
        "room",
        "revoke-invite",
        shared_room["room_id"],
        shared_room["invite_id"],
        "--json",
    )
    assert set(revoked["revoked"]) == {shared_room["invite_id"], child["invite_id"]}
    gone = cli.run("--profile", "carol", "room", "ask", child["link"], "q")
    assert gone.exit_code == 3 and "credential_revoked" in gone.stderr


def test_no_wait_then_run_wait_delivers_the_verified_answer(cli: Cli, shared_room: dict) -> None:
    cli.ok("--profile", "bob", "room", "accept", shared_room["link"], input="y\n")
    submitted = cli.ok("--profile", "bob", "room", "ask", shared_room["link"], "later", "--no-wait", "--json")
    assert submitted["status"] == "pending"
    delivered = cli.ok("--profile", "bob", "run", "wait", submitted["run_id"], "--json")
    assert delivered["verified"] is True and json.loads(delivered["output"])["prompt"] == "later"


def test_run_stats_sums_stage_telemetry(cli: Cli, shared_room: dict) -> None:
    cli.ok("--profile", "bob", "room", "accept", shared_room["link"], input="y\n")
    for question in ("a", "b"):
        cli.ok("--profile", "bob", "room", "ask", shared_room["link"], question, "--json")
    stats = cli.ok("--profile", "owner", "run", "stats", shared_room["room_id"], "--json")
    assert stats["runs"] == 2 and stats["statuses"] == {"completed": 2}
    assert stats["stages"]["scope"] == {"runs": 2, "p50_s": 1.0, "p95_s": 1.0}
    assert stats["stages"]["mediator"]["p95_s"] == 3.0
    assert stats["tool_calls"] == {"sql": 6}


def test_provider_key_is_sealed_to_the_attested_runner(cli: Cli, fake: FakeService) -> None:
    created = cli.signup("owner")
    stored = cli.ok(
        "--profile", "owner", "tenant", "set-provider-key", "openrouter", "--json", input="sk-or-secret-123\n"
    )
    assert stored["stored"] is True
    body = fake.provider_keys[(created["tenant_id"], "openrouter")]
    assert "sk-or-secret-123" not in json.dumps(body)
    sealed = SealedEnvelope.model_validate(body["sealed_key"])
    tenant_id = created["tenant_id"]
    assert open_provider_key(fake.runner_keys, sealed, tenant_id=tenant_id, provider="openrouter") == (
        "sk-or-secret-123"
    )
    with pytest.raises(EnvelopeError, match="does not open"):
        open_provider_key(fake.runner_keys, sealed, tenant_id=tenant_id, provider="tinfoil")
    spaced = cli.run("--profile", "owner", "tenant", "set-provider-key", "openrouter", input="two words\n")
    assert spaced.exit_code == 2 and "printable ASCII without spaces" in spaced.stderr


def test_trust_attest_lists_each_runner_and_fails_when_none_verifies(cli: Cli, fake: FakeService) -> None:
    cli.signup("owner")
    listed = cli.ok("--profile", "owner", "trust", "attest", "--json")
    assert [(r["runner_id"], r["verified"], r["tee"]) for r in listed["runners"]] == [
        ("runner_fake1", True, "simulated")
    ]
    cli.ok("--profile", "owner", "profile", "set", "--refuse-simulated")
    refused = cli.run("--profile", "owner", "trust", "attest", "--json")
    assert refused.exit_code == 5
    assert refused.json()["runners"][0]["error"] == "simulated_tee_refused"


def test_room_inspect_shows_the_signed_terms(cli: Cli, shared_room: dict) -> None:
    shown = cli.ok("--profile", "bob", "room", "inspect", shared_room["link"], "--json")
    assert shown["accepted"] is False and shown["key_rotated"] is False
    assert shown["manifest"]["rules"] == "Only aggregate answers; groups of at least 5.\n"
    assert shown["runners"][0]["verified"] is True
    text = cli.run("--profile", "bob", "room", "inspect", shared_room["link"])
    assert "Only aggregate answers" in text.stdout and "not accepted yet" in text.stderr


def test_uploadable_room_takes_the_participants_own_query_agent(
    cli: Cli, fake: FakeService, agent_dir: Path, rules_file: Path, tmp_path: Path
) -> None:
    cli.signup("owner")
    room = cli.ok(
        "--profile",
        "owner",
        "room",
        "create",
        str(agent_dir),
        "--name",
        "Open",
        "--rules-file",
        str(rules_file),
        "--uploadable-query",
        "--json",
    )
    cli.signup("bob")
    cli.ok("--profile", "bob", "room", "accept", room["link"], input="y\n")
    mine = write_agent(tmp_path / "bobs-agent", {"Dockerfile": "FROM x\n", "main.py": "print('bob')\n"})
    answer = cli.ok(
        "--profile", "bob", "room", "ask", room["link"], "q", "--query-agent", str(mine), "--json"
    )
    assert answer["verified"] is True
    run = fake.runs[answer["run_id"]]
    assert run.query_agent_id is not None and fake.agents[run.query_agent_id]["room_id"] == room["room_id"]
    fixed = make_room(cli, agent_dir, rules_file)
    cli.ok("--profile", "bob", "room", "accept", fixed["link"], input="y\n")
    refused = cli.run("--profile", "bob", "room", "ask", fixed["link"], "q", "--query-agent", str(mine))
    assert refused.exit_code == 2 and "fixed query agent" in refused.stderr


def test_artifacts_are_decrypted_and_verified_into_a_directory(
    cli: Cli, fake: FakeService, shared_room: dict, tmp_path: Path
) -> None:
    cli.ok("--profile", "bob", "room", "accept", shared_room["link"], input="y\n")
    fake.artifacts = {"chart.svg": b"<svg/>", "table.csv": b"a,b\n1,2\n"}
    run_id = cli.ok("--profile", "bob", "room", "ask", shared_room["link"], "q", "--json")["run_id"]
    out = tmp_path / "artifacts"
    saved = cli.ok("--profile", "bob", "run", "artifacts", run_id, "--out", str(out), "--json")["artifacts"]
    assert sorted(entry["name"] for entry in saved) == ["chart.svg", "table.csv"]
    assert (out / "table.csv").read_bytes() == b"a,b\n1,2\n"

    fake.corrupt_artifact = True
    run_id = cli.ok("--profile", "bob", "room", "ask", shared_room["link"], "q2", "--json")["run_id"]
    elsewhere = tmp_path / "tampered"
    refused = cli.run("--profile", "bob", "run", "artifacts", run_id, "--out", str(elsewhere))
    assert refused.exit_code == 5, repr(refused)
    assert "artifacts[chart.svg].ciphertext_sha256" in refused.stderr
    assert list(elsewhere.iterdir()) == []  # nothing unverified is left behind
