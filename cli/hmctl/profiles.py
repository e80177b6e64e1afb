"""Profiles: which service to talk to, with which key, and what this profile has accepted (DESIGN §13).

Files (all created 0600 in 0700 directories; a secrets file that group or others can read is refused
with the command that fixes it, DESIGN §16.13):

- ``<config>/profiles.toml``: every profile and the current one. ``<config>`` is ``$HMCTL_CONFIG_DIR``,
  else ``$XDG_CONFIG_HOME/hmctl``, else ``~/.config/hmctl``.
- ``<config>/state/<profile>/accepted.json``: the manifest each room was accepted at (hash, revision,
  keys), so later runs refuse a changed manifest until it is accepted again, and never roll back.
- ``<config>/state/<profile>/runs.json``: for each run this profile started, the fresh reply key its
  output is sealed to and what its receipt must say, so ``hmctl run output`` works later.
- ``<cache>/collateral/``: Intel DCAP collateral cache (``$HMCTL_CONFIG_DIR/cache``, else
  ``$XDG_CACHE_HOME/hmctl``, else ``~/.cache/hmctl``).

Secrets are never printed: :meth:`Profile.public_view` shows a key's prefix and its public id only.

Usage::

    store = ProfileStore.from_environment()
    profile = store.load("alice")            # ProfileError if missing or unsafe
    store.save(profile.model_copy(update={"allow_simulated": True}))
    store.accepted("alice").get("room_x")   # AcceptedManifest | None
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import stat
import tomllib
from collections.abc import Iterator, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from hivemind.attestation import is_loopback_service
from hivemind.errors import InvalidLink, InvalidToken
from hivemind.keys import credential_id
from hivemind.manifest import InviteLink
from hivemind.models import Sha256Hex, StrictModel, UnixSeconds
from hivemind.tokens import Secret, TokenKind
from hmctl.errors import ProfileError

PROFILES_FILE = "profiles.toml"
CONFIG_DIR_ENV = "HMCTL_CONFIG_DIR"
PROFILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_FILE_MODE = 0o600
_DIR_MODE = 0o700
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")

Entry = TypeVar("Entry", bound=StrictModel)


def check_profile_name(name: str) -> str:
    if not PROFILE_NAME.fullmatch(name):
        raise ProfileError(
            f"{name!r} is not a valid profile name",
            hint="use letters, digits, '_', '-' and '.', starting with a letter or digit (max 64)",
        )
    return name


def check_service_url(url: str) -> str:
    """A service URL is https, or plain http on loopback only (it carries bearer tokens)."""
    url = url.rstrip("/")
    try:
        # The link validator holds the one definition of an acceptable service URL.
        InviteLink.model_validate(
            {"service": url, "room_id": "room_x", "invite": _PROBE_INVITE, "owner_sign_pub": _PROBE_KEY}
        )
    except (InvalidLink, ValidationError) as exc:
        message = exc.message if isinstance(exc, InvalidLink) else str(exc.errors()[0]["msg"])
        raise ProfileError(f"service URL {url!r} is not usable: {message}") from None
    return url


_PROBE_INVITE = Secret(TokenKind.INVITE, bytes(32)).token()
_PROBE_KEY = "A" * 43


class ProfileKind(StrEnum):
    TENANT = "tenant"  # an hmk_ account key: owns rooms, pays for runs
    ADMIN = "admin"  # an hma_ operator key
    LINK = "link"  # no key of its own: uses invite links only


class Profile(BaseModel):
    """One profile. ``key`` is a secret token; it never appears in ``repr`` or any output."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    service: str
    key: str | None = Field(default=None, repr=False)
    tenant_id: str | None = None
    # None: simulated runners are allowed only when the service is on loopback (DESIGN §6).
    allow_simulated: bool | None = None
    pccs_url: str | None = None
    # Old tenant secrets after ``tenant rotate-key``: they open owner outputs sealed before the rotation.
    retired_keys: list[str] = Field(default_factory=list, repr=False)
    # The new secret of a rotation that was started and not yet confirmed by the service.
    pending_key: str | None = Field(default=None, repr=False)
    # Old service URL -> new one, for invite links made before the service moved.
    service_aliases: dict[str, str] = Field(default_factory=dict)
    # Invite links this profile accepted, by room id (bearer credentials: kept in this 0600 file).
    links: dict[str, str] = Field(default_factory=dict, repr=False)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_profile_name(value)

    @field_validator("service")
    @classmethod
    def _service(cls, value: str) -> str:
        return check_service_url(value)

    @field_validator("key", "pending_key")
    @classmethod
    def _key(cls, value: str | None) -> str | None:
        if value is None:
            return None
        kind = _parse_secret(value).kind
        if kind not in (TokenKind.TENANT, TokenKind.ADMIN):
            raise ValueError(f"a profile key is an hmk_ or hma_ token, not {kind.value}_")
        return value

    @field_validator("retired_keys")
    @classmethod
    def _retired(cls, values: list[str]) -> list[str]:
        for value in values:
            if _parse_secret(value).kind is not TokenKind.TENANT:
                raise ValueError("retired keys are hmk_ tokens")
        return values

    @property
    def kind(self) -> ProfileKind:
        if self.key is None:
            return ProfileKind.LINK
        return ProfileKind.ADMIN if self.key.startswith("hma_") else ProfileKind.TENANT

    def secret(self) -> Secret:
        """The profile's key, parsed; a link-only profile has none."""
        if self.key is None:
            raise ProfileError(
                f"profile {self.name} has no key of its own (it only uses invite links)",
                hint="run `hmctl signup NAME --service URL` or `hmctl init NAME --service URL --key-stdin`",
            )
        return _parse_secret(self.key)

    def tenant_secret(self) -> Secret:
        secret = self.secret()
        if secret.kind is not TokenKind.TENANT:
            raise ProfileError(
                f"profile {self.name} holds an admin key; this command needs a tenant (hmk_) profile",
                hint="pass --profile with a tenant profile (see `hmctl profile list`)",
            )
        return secret

    def admin_secret(self) -> Secret:
        secret = self.secret()
        if secret.kind is not TokenKind.ADMIN:
            raise ProfileError(
                f"profile {self.name} holds a tenant key; admin commands need an admin (hma_) profile",
                hint="pass --profile with an admin profile (see `hmctl profile list`)",
            )
        return secret

    def allows_simulated(self, service: str) -> bool:
        """Whether runners without a TEE are acceptable for ``service`` (default: loopback only)."""
        if self.allow_simulated is not None:
            return self.allow_simulated
        return is_loopback_service(service)

    def resolve_service(self, service: str) -> str:
        """``service`` after the profile's aliases (an old URL a link still names -> the current one)."""
        return self.service_aliases.get(service.rstrip("/"), service.rstrip("/"))

    def public_view(self) -> dict[str, Any]:
        """What ``profile show`` prints: no secret, only prefixes and public ids."""
        return {
            "name": self.name,
            "kind": self.kind.value,
            "service": self.service,
            "tenant_id": self.tenant_id,
            "key": redact_token(self.key) if self.key else None,
            "key_id": credential_id(self.secret()) if self.key else None,
            "allow_simulated": self.allows_simulated(self.service),
            "pccs_url": self.pccs_url,
            "retired_keys": len(self.retired_keys),
            "rotation_pending": self.pending_key is not None,
            "service_aliases": dict(self.service_aliases),
            "rooms_joined": sorted(self.links),
        }


def _parse_secret(token: str) -> Secret:
    try:
        return Secret.parse(token)
    except InvalidToken as exc:
        raise ValueError(exc.message) from None


def redact_token(token: str) -> str:
    """``hmk_abcd…``: enough to tell keys apart, nothing that helps guess one."""
    prefix, _, body = token.partition("_")
    return f"{prefix}_{body[:4]}…"


# --- accepted manifests and run tickets -------------------------------------------------------------


class AcceptedManifest(StrictModel):
    """A manifest this profile accepted for a room."""

    room_id: str
    manifest_hash: Sha256Hex
    revision: int = Field(ge=1)
    # The owner key the manifest was verified against (the link's, or the profile's own) and the key
    # that signed it (they differ after an owner key rotation).
    pinned_sign_pub: str
    owner_sign_pub: str
    # Hash of the manifest without its owner keys and revision: an owner key rotation keeps it.
    terms_sha256: Sha256Hex
    accepted_at: UnixSeconds


class RunTicket(StrictModel):
    """What ``room ask`` keeps about a run it submitted: enough to fetch, open and verify the output."""

    run_id: str
    room_id: str
    service: str
    link: str | None = Field(default=None, repr=False)  # the invite link used, when not the profile key
    reply_key: str = Field(repr=False)  # base64url X25519 private key the output key is sealed to
    owner_tenant_id: str
    manifest_hash: Sha256Hex
    prompt_sha256: Sha256Hex
    runner_id: str
    runner_sign_pub: str
    allowed_compose_hashes: list[Sha256Hex]
    attestation_skipped: bool = False
    created_at: UnixSeconds


class _JsonState(Generic[Entry]):
    """A ``{key: entry}`` JSON file with private permissions, rewritten atomically."""

    def __init__(self, path: Path, entry_type: type[Entry]) -> None:
        self.path = path
        self._entry_type = entry_type

    def _read(self) -> dict[str, Entry]:
        text = read_private_text(self.path)
        if text is None:
            return {}
        try:
            raw = json.loads(text)
            if not isinstance(raw, dict):
                raise TypeError("not an object")
            return {key: self._entry_type.model_validate(value) for key, value in raw.items()}
        except (ValueError, TypeError, ValidationError) as exc:
            raise ProfileError(
                f"{self.path} is damaged ({exc.__class__.__name__})",
                hint=f"move it aside (mv {self.path} {self.path}.bak) and accept rooms again",
            ) from None

    def get(self, key: str) -> Entry | None:
        return self._read().get(key)

    def all(self) -> dict[str, Entry]:
        return self._read()

    def put(self, key: str, entry: Entry) -> None:
        with _locked(self.path.parent):
            entries = self._read()
            entries[key] = entry
            write_private_text(
                self.path,
                json.dumps({name: entry.model_dump(mode="json") for name, entry in entries.items()}),
            )


class AcceptedManifests(_JsonState[AcceptedManifest]):
    pass


class RunTickets(_JsonState[RunTicket]):
    pass


# --- the store --------------------------------------------------------------------------------------


class ProfilesFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    current: str | None = None
    profiles: dict[str, dict[str, Any]] = Field(default_factory=dict)


class ProfileStore:
    """Profiles and per-profile state under one configuration directory."""

    def __init__(self, config_dir: Path, cache_dir: Path) -> None:
        self.config_dir = config_dir
        self.cache_dir = cache_dir

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> ProfileStore:
        env = os.environ if environ is None else environ
        home = Path(env.get("HOME") or Path.home())
        explicit = env.get(CONFIG_DIR_ENV)
        if explicit:
            root = Path(explicit)
            return cls(root, root / "cache")
        config_home = Path(env.get("XDG_CONFIG_HOME") or home / ".config")
        cache_home = Path(env.get("XDG_CACHE_HOME") or home / ".cache")
        return cls(config_home / "hmctl", cache_home / "hmctl")

    @property
    def path(self) -> Path:
        return self.config_dir / PROFILES_FILE

    @property
    def collateral_dir(self) -> Path:
        return self.cache_dir / "collateral"

    def _read(self) -> ProfilesFile:
        text = read_private_text(self.path)
        if text is None:
            return ProfilesFile()
        try:
            return ProfilesFile.model_validate(tomllib.loads(text))
        except (tomllib.TOMLDecodeError, ValidationError) as exc:
            raise ProfileError(
                f"{self.path} is not a valid profiles file: {exc}",
                hint=f"fix it, or move it aside (mv {self.path} {self.path}.bak) and run `hmctl init`",
            ) from None

    def _write(self, content: ProfilesFile) -> None:
        write_private_text(self.path, dump_toml(content.model_dump(exclude_none=True)))

    def names(self) -> list[str]:
        return sorted(self._read().profiles)

    def current(self) -> str | None:
        return self._read().current

    def exists(self, name: str) -> bool:
        return name in self._read().profiles

    def load(self, name: str | None = None) -> Profile:
        """The named profile, or the current one; ProfileError says how to create one if missing."""
        content = self._read()
        chosen = name or content.current
        if chosen is None:
            raise ProfileError(
                "no profile selected and none is current",
                hint="create one with `hmctl signup NAME --service URL` or `hmctl init NAME --service URL`, "
                "or pass --profile NAME",
            )
        raw = content.profiles.get(chosen)
        if raw is None:
            known = ", ".join(sorted(content.profiles)) or "none"
            raise ProfileError(
                f"no profile named {chosen} (profiles: {known})",
                hint=f"create it: `hmctl signup {chosen} --service URL` (or `hmctl init {chosen} ...`)",
            )
        try:
            return Profile.model_validate({**raw, "name": chosen})
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"]) or "profile"
            raise ProfileError(
                f"profile {chosen} in {self.path} is invalid: {where}: {error['msg']}",
                hint=f"fix the [profiles.{chosen}] table, or remove it with `hmctl profile rm {chosen}`",
            ) from None

    def save(self, profile: Profile, *, make_current: bool = False) -> None:
        with _locked(self.config_dir):
            content = self._read()
            content.profiles[profile.name] = profile.model_dump(exclude={"name"}, exclude_none=True)
            if make_current or content.current is None:
                content.current = profile.name
            self._write(content)

    def remove(self, name: str) -> None:
        with _locked(self.config_dir):
            content = self._read()
            if name not in content.profiles:
                raise ProfileError(f"no profile named {name}")
            del content.profiles[name]
            if content.current == name:
                content.current = None
            self._write(content)

    def use(self, name: str) -> None:
        with _locked(self.config_dir):
            content = self._read()
            if name not in content.profiles:
                known = ", ".join(sorted(content.profiles)) or "none"
                raise ProfileError(f"no profile named {name} (profiles: {known})")
            content.current = name
            self._write(content)

    def _state_dir(self, name: str) -> Path:
        return self.config_dir / "state" / check_profile_name(name)

    def accepted(self, name: str) -> AcceptedManifests:
        return AcceptedManifests(self._state_dir(name) / "accepted.json", AcceptedManifest)

    def run_tickets(self, name: str) -> RunTickets:
        return RunTickets(self._state_dir(name) / "runs.json", RunTicket)


# --- private files ----------------------------------------------------------------------------------


def _refuse_unsafe(path: Path, info: os.stat_result) -> None:
    if info.st_uid != os.getuid():
        raise ProfileError(
            f"{path} belongs to another user (uid {info.st_uid}); refusing to read secrets from it",
            hint=f"use your own configuration directory (set {CONFIG_DIR_ENV})",
        )
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise ProfileError(
            f"{path} is readable or writable by group or others (mode {stat.S_IMODE(info.st_mode):o}); it "
            "holds secrets, so it is not read",
            hint=f"run: chmod 600 {path}  (then consider rotating its keys: hmctl tenant rotate-key)",
        )


def read_private_text(path: Path) -> str | None:
    """The text of a private file, or None if it does not exist; refuse one others could read."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ProfileError(f"cannot read {path}: {exc.strerror}") from None
    with os.fdopen(descriptor, "r", encoding="utf-8") as handle:
        _refuse_unsafe(path, os.fstat(handle.fileno()))
        return handle.read()


def ensure_private_dir(path: Path) -> None:
    path.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    info = path.stat()
    if stat.S_IMODE(info.st_mode) & 0o077:
        # Our own directory: tighten it rather than refuse (files inside are checked one by one).
        with contextlib.suppress(PermissionError):
            path.chmod(_DIR_MODE)


def write_private_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, as a new 0600 file (never through a symlink)."""
    ensure_private_dir(path.parent)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, _FILE_MODE)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive lock for a read-modify-write of files in ``directory`` (two hmctl at once)."""
    ensure_private_dir(directory)
    descriptor = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, _FILE_MODE)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


# --- a small TOML writer for the profiles file -------------------------------------------------------


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    # JSON's string escapes (with ensure_ascii) are a subset of TOML basic-string escapes.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=True)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to the profiles file")


def dump_toml(document: Mapping[str, Any]) -> str:
    """TOML for a document of strings, integers, booleans, lists of those, and nested tables."""
    lines: list[str] = []

    def table(path: list[str], content: Mapping[str, Any]) -> None:
        scalars = {key: value for key, value in content.items() if not isinstance(value, Mapping)}
        tables = {key: value for key, value in content.items() if isinstance(value, Mapping)}
        if path and (scalars or not tables):
            lines.append("")
            lines.append("[" + ".".join(_toml_key(part) for part in path) + "]")
        for key, value in scalars.items():
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
        for key, value in tables.items():
            table([*path, key], value)

    table([], document)
    return "\n".join(lines).lstrip("\n") + "\n"
