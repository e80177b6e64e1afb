"""Create an admin credential from the auth hash of an ``hma_`` secret (the deployment's first operator).

The secret stays with the operator: ``hmctl`` generates it and prints ``hivemind.keys.auth_hash`` of it,
and this writes only that hash. Whoever can run this has write access to the deployment's tables anyway
(it uses the deployment's AWS credentials), so it is the root of trust for admin keys.

    python -m hivemind_functions.bootstrap_admin --auth-hash <64 hex> [--label "ops laptop"]

The local stack calls :func:`create_admin` directly.
"""

from __future__ import annotations

import argparse
import json
import re

from hivemind.errors import Conflict, InvalidInput
from hivemind.store import AwsClients, Store
from hivemind.store.credentials import CredentialKind, CredentialRecord
from hivemind_functions.settings import FunctionSettings

_AUTH_HASH = re.compile(r"^[0-9a-f]{64}$")


def create_admin(store: Store, auth_hash: str, *, label: str | None = None) -> CredentialRecord:
    """Register an admin key by its auth hash. Repeating it for the same hash returns the existing admin
    credential; a hash registered as another kind of key is ``key_already_registered``."""
    if not _AUTH_HASH.fullmatch(auth_hash):
        raise InvalidInput(
            "an auth hash is 64 lowercase hex digits (hivemind.keys.auth_hash of the hma_ secret)"
        )
    existing = store.credentials.get(auth_hash)
    if existing is not None:
        if existing.kind is CredentialKind.ADMIN and not existing.revoked:
            return existing
        raise Conflict("this key is already registered", code="key_already_registered")
    record = CredentialRecord(
        auth_hash=auth_hash,
        kind=CredentialKind.ADMIN,
        token_id=auth_hash[:16],
        label=label,
        created_at=store.clock(),
    )
    try:
        return store.credentials.put(record)
    except Conflict:
        raced = store.credentials.get(auth_hash)
        if raced is not None and raced.kind is CredentialKind.ADMIN and not raced.revoked:
            return raced
        raise Conflict("this key is already registered", code="key_already_registered") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Create an admin credential from an hma_ key's auth hash.")
    parser.add_argument("--auth-hash", required=True, help="hivemind.keys.auth_hash of the hma_ secret (hex)")
    parser.add_argument("--label", default=None, help="a note on whose key this is")
    args = parser.parse_args(argv)
    settings = FunctionSettings.from_env()
    record = create_admin(Store(AwsClients(settings.store)), args.auth_hash.strip().lower(), label=args.label)
    print(
        json.dumps({"kind": record.kind.value, "token_id": record.token_id, "created_at": record.created_at})
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
