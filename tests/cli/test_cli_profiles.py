"""Profiles: where they live, file modes, refusing unsafe files, never printing secrets (§13, §16.13)."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

import pytest
from hmctl_fakes import FakeService, Refusal
from hmctl_harness import Cli, accepted_room

from hivemind.keys import auth_token
from hivemind.tokens import Secret, TokenKind
from hmctl.errors import ProfileError
from hmctl.profiles import Profile, ProfileStore, dump_toml, redact_token


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_config_dir_follows_hmctl_config_dir_then_xdg_then_home(tmp_path: Path) -> None:
    explicit = ProfileStore.from_environment({"HMCTL_CONFIG_DIR": str(tmp_path / "x"), "HOME": "/nowhere"})
    assert (
        explicit.path == tmp_path / "x" / "profiles.toml"
        and explicit.collateral_dir == tmp_path / "x" / "cache" / "collateral"
    )
    xdg = ProfileStore.from_environment(
        {"XDG_CONFIG_HOME": "/cfg", "XDG_CACHE_HOME": "/cache", "HOME": "/home/u"}
    )
    assert xdg.path == Path("/cfg/hmctl/profiles.toml") and xdg.collateral_dir == Path(
        "/cache/hmctl/collateral"
    )
    home = ProfileStore.from_environment({"HOME": "/home/u"})
    assert home.path == Path("/home/u/.config/hmctl/profiles.toml")


def test_signup_writes_private_files_and_never_prints_the_key(cli: Cli, config_dir: Path) -> None:
    created = cli.signup("alice")
    secret = cli.store.load("alice").key
    assert secret is not None and secret.startswith("hmk_")
    assert mode(config_dir) == 0o700 and mode(config_dir / "profiles.toml") == 0o600
    for args in (
        ["profile", "show", "alice"],
        ["profile", "show", "alice", "--json"],
        ["profile", "list", "--json"],
        ["--profile", "alice", "whoami", "--json"],
    ):
        outcome = cli.run(*args)
        assert outcome.exit_code == 0, repr(outcome)
        body = secret.removeprefix("hmk_")
        assert body not in outcome.stdout + outcome.stderr
        assert auth_token(Secret.parse(secret)).removeprefix("hmk_") not in outcome.stdout + outcome.stderr
    shown = cli.ok("profile", "show", "alice", "--json")
    assert shown["key"] == redact_token(secret) and shown["key_id"] == created["key_id"]


def test_accepted_and_run_state_is_private(
    cli: Cli, config_dir: Path, agent_dir: Path, rules_file: Path
) -> None:
    link = accepted_room(cli, agent_dir, rules_file)
    cli.ok("--profile", "bob", "room", "ask", link, "q", "--json")
    state = config_dir / "state" / "bob"
    assert mode(state) == 0o700
    assert mode(state / "accepted.json") == 0o600 and mode(state / "runs.json") == 0o600


@pytest.mark.parametrize("loose", [0o640, 0o604, 0o660])
def test_a_group_or_world_readable_profile_file_is_refused_with_the_fix(
    cli: Cli, config_dir: Path, loose: int
) -> None:
    cli.signup("alice")
    path = config_dir / "profiles.toml"
    path.chmod(loose)
    refused = cli.run("--profile", "alice", "whoami")
    assert refused.exit_code == 2, repr(refused)
    assert "readable or writable by group or others" in refused.stderr
    assert f"chmod 600 {path}" in refused.stderr


def test_a_loose_state_file_is_refused_too(
    cli: Cli, config_dir: Path, agent_dir: Path, rules_file: Path
) -> None:
    link = accepted_room(cli, agent_dir, rules_file)
    (config_dir / "state" / "bob" / "accepted.json").chmod(0o644)
    refused = cli.run("--profile", "bob", "room", "ask", link, "q")
    assert refused.exit_code == 2 and "accepted.json is readable" in refused.stderr


def test_a_symlinked_profile_file_is_not_followed(cli: Cli, config_dir: Path, tmp_path: Path) -> None:
    cli.signup("alice")
    real = tmp_path / "elsewhere.toml"
    (config_dir / "profiles.toml").rename(real)
    (config_dir / "profiles.toml").symlink_to(real)
    refused = cli.run("--profile", "alice", "whoami")
    assert refused.exit_code == 2 and "cannot read" in refused.stderr


def test_missing_profile_says_how_to_create_one(cli: Cli) -> None:
    refused = cli.run("--profile", "ghost", "whoami")
    assert refused.exit_code == 2
    assert "no profile named ghost" in refused.stderr and "hmctl signup ghost --service URL" in refused.stderr
    nothing = cli.run("whoami")
    assert nothing.exit_code == 2 and "no profile selected" in nothing.stderr


def test_profile_use_list_and_set(cli: Cli) -> None:
    cli.signup("alice")
    cli.signup("bob")
    assert cli.ok("profile", "list", "--json")["current"] == "alice"  # the first profile becomes current
    cli.ok("profile", "use", "bob")
    listing = cli.ok("profile", "list", "--json")
    assert listing["current"] == "bob" and [p["name"] for p in listing["profiles"]] == ["alice", "bob"]
    assert cli.ok("whoami", "--json")["profile"] == "bob"
    changed = cli.ok(
        "--profile",
        "alice",
        "profile",
        "set",
        "--refuse-simulated",
        "--service-alias",
        "https://old.example.com=https://new.example.com",
        "--json",
    )
    assert changed["allow_simulated"] is False
    assert changed["service_aliases"] == {"https://old.example.com": "https://new.example.com"}
    assert (
        cli.ok("--profile", "alice", "profile", "set", "--default-simulated", "--json")["allow_simulated"]
        is True
    )


def test_init_with_an_existing_key_read_from_stdin(cli: Cli, fake: FakeService) -> None:
    cli.signup("alice")
    key = cli.store.load("alice").key
    assert key is not None
    created = cli.ok("init", "laptop", "--service", cli.service, "--key-stdin", "--json", input=key + "\n")
    assert created["tenant_id"] == cli.store.load("alice").tenant_id and created["kind"] == "tenant"
    again = cli.run("init", "laptop", "--service", cli.service)
    assert again.exit_code == 2 and "exists" in again.stderr
    link_only = cli.ok("init", "reader", "--service", cli.service, "--json")
    assert link_only["kind"] == "link" and link_only["key"] is None


def test_signup_that_the_service_refuses_leaves_no_profile(cli: Cli, fake: FakeService) -> None:
    def refuse(request: object, body: object) -> object:
        raise Refusal(403, "signup_disabled", "self-serve signup is disabled on this deployment")

    fake.signup = refuse  # type: ignore[method-assign]
    refused = cli.run("signup", "alice", "--service", cli.service)
    assert refused.exit_code == 6, repr(refused)
    assert "signup_disabled" in refused.stderr
    assert not cli.store.exists("alice")


def test_plain_http_service_is_refused_off_loopback(cli: Cli) -> None:
    refused = cli.run("signup", "alice", "--service", "http://api.example.com")
    assert refused.exit_code == 2 and "plain http is allowed only on loopback" in refused.stderr


def test_toml_writer_round_trips_awkward_text() -> None:
    document = {
        "current": 'a "quoted" \\ name',
        "profiles": {
            "p.1": {
                "service": "https://x",
                "flag": True,
                "n": 3,
                "keys": ["a", "b\n"],
                "aliases": {"https://o/": "é"},
            }
        },
    }
    assert tomllib.loads(dump_toml(document)) == document


def test_profile_repr_hides_secrets() -> None:
    secret = Secret.generate(TokenKind.TENANT)
    profile = Profile(
        name="x", service="https://x.example", key=secret.token(), links={"room_a": "hmroom://..."}
    )
    assert secret.token() not in repr(profile) and "hmroom" not in repr(profile)


def test_store_refuses_a_file_of_another_user(tmp_path: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to chown")
    store = ProfileStore(tmp_path / "cfg", tmp_path / "cache")
    store.save(Profile(name="x", service="https://x.example"))
    os.chown(store.path, 12345, -1)
    with pytest.raises(ProfileError, match="belongs to another user"):
        store.load("x")
