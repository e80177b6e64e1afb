"""Tenant key rotation (``hmctl tenant rotate-key``) that keeps every room working (DESIGN §3, §16.11).

Rotating the tenant secret changes every key derived from it: the auth hash, ``owner_sign_pub``,
``owner_box_pub`` and each room's wrap key. Links already shared and manifests already accepted pin the
old signing key, so the client:

1. makes the new secret and keeps it in the profile as ``pending_key`` before telling the service
   anything (an interrupted rotation resumes with the same key, never loses it);
2. signs a key-rotation certificate ``{tenant_id, old_sign_pub, new_sign_pub, new_box_pub, rotated_at}``
   with the OLD owner-sign key (:class:`hivemind.manifest.SignedKeyRotation`);
3. for every room of the tenant: verifies its manifest under the old key, re-signs it with the new key
   at ``revision + 1`` (:func:`hivemind.manifest.rotated_revision`: nothing but the owner keys
   changes), and re-wraps the room DEK under the new secret (no data is re-encrypted);
4. sends it all in one request, ``POST /v1/tenant/key-rotation``, authenticated by the old key; the
   service checks the certificate and every room, stores them and swaps the auth hash atomically;
5. makes the new key the profile's key and keeps the old one in ``retired_keys`` (it still opens
   outputs sealed to the old owner-box key) unless asked to forget it.

Readers that pin the old key follow the certificate (``owner_key_rotations`` in room views) to the new
one; participants do not have to accept the room again, because its terms did not change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hivemind.errors import HivemindError
from hivemind.keys import auth_hash, credential_id, owner_sign_key, wrap_dek, wrap_key
from hivemind.manifest import (
    KeyRotation,
    SignedKeyRotation,
    rotated_revision,
    sign_key_rotation,
    sign_manifest,
)
from hivemind.tokens import Secret, TokenKind
from hmctl.client import ApiClient
from hmctl.errors import CliError, ExitCode, ProfileError
from hmctl.profiles import Profile, ProfileStore
from hmctl.rooms import owned_room, owner_box_pub, owner_sign_pub, room_dek

ROTATION_PATH = "/v1/tenant/key-rotation"


@dataclass(frozen=True)
class RotationPlan:
    """Everything the rotation request carries; built and checked before anything is sent."""

    new_secret: Secret = field(repr=False)
    certificate: SignedKeyRotation
    rooms: list[dict[str, Any]] = field(repr=False)

    def request_body(self) -> dict[str, Any]:
        return {
            "new_auth_hash": auth_hash(self.new_secret),
            "rotation": self.certificate.model_dump(mode="json"),
            "rooms": self.rooms,
        }


def plan_rotation(api: ApiClient, *, old: Secret, new: Secret, tenant_id: str, now: int) -> RotationPlan:
    """Sign the certificate, then re-sign and re-wrap every active room the old key owns."""
    certificate = sign_key_rotation(
        KeyRotation(
            tenant_id=tenant_id,
            old_sign_pub=owner_sign_pub(old),
            new_sign_pub=owner_sign_pub(new),
            new_box_pub=owner_box_pub(new),
            rotated_at=now,
        ),
        owner_sign_key(old),
    )
    summaries = api.get_all("/v1/rooms", "rooms")
    broken = [summary["room_id"] for summary in summaries if summary.get("status") != "active"]
    if broken:
        raise CliError(
            f"the stored manifests of rooms {', '.join(broken)} do not verify, so they cannot be re-signed",
            hint="inspect them (hmctl room inspect ROOM) and delete or re-create them, then rotate again",
            exit_code=ExitCode.VERIFICATION,
        )
    rooms: list[dict[str, Any]] = []
    for summary in summaries:
        room_id = summary["room_id"]
        signed = owned_room(api, old, room_id)
        dek = room_dek(api, old, room_id, tenant_id)
        resigned = sign_manifest(rotated_revision(signed.manifest, certificate.rotation), owner_sign_key(new))
        rooms.append(
            {
                "room_id": room_id,
                "signed_manifest": resigned.model_dump(mode="json"),
                "owner_wrap": wrap_dek(wrap_key(new, room_id), dek, room_id=room_id, bearer_id=tenant_id),
            }
        )
    return RotationPlan(new_secret=new, certificate=certificate, rooms=rooms)


@dataclass(frozen=True)
class RotationResult:
    tenant_id: str
    old_key_id: str
    new_key_id: str
    rooms: list[str]
    resumed: bool


def rotate_key(
    store: ProfileStore,
    profile: Profile,
    *,
    api_for: Callable[[Secret], ApiClient],
    now: int,
    keep_old_key: bool = True,
) -> RotationResult:
    """Run (or resume) the rotation of ``profile``'s tenant key; ``api_for(secret)`` makes a client."""
    old = profile.tenant_secret()
    tenant_id = profile.tenant_id
    if tenant_id is None:
        raise ProfileError(f"profile {profile.name} does not know its tenant id", hint="run: hmctl whoami")
    if profile.pending_key is not None:
        new = Secret.parse(profile.pending_key, expect=TokenKind.TENANT)
        resumed = True
    else:
        new = Secret.generate(TokenKind.TENANT)
        store.save(profile.model_copy(update={"pending_key": new.token()}))
        resumed = False
    if resumed and _already_rotated(api_for(new), tenant_id):
        rooms: list[str] = []
    else:
        with api_for(old) as api:
            plan = plan_rotation(api, old=old, new=new, tenant_id=tenant_id, now=now)
            api.post(ROTATION_PATH, plan.request_body())
        rooms = [room["room_id"] for room in plan.rooms]
    retired = [*profile.retired_keys, old.token()] if keep_old_key else list(profile.retired_keys)
    store.save(profile.model_copy(update={"key": new.token(), "pending_key": None, "retired_keys": retired}))
    return RotationResult(
        tenant_id=tenant_id,
        old_key_id=credential_id(old),
        new_key_id=credential_id(new),
        rooms=rooms,
        resumed=resumed,
    )


def _already_rotated(api: ApiClient, tenant_id: str) -> bool:
    """Whether the service already knows the pending key as this tenant's (the request went through)."""
    with api:
        try:
            me = api.get("/v1/whoami")
        except HivemindError as exc:
            if exc.code.startswith("credential"):
                return False
            raise
    return me.get("tenant_id") == tenant_id
