"""The runner's key material, all derived from the one 32-byte seed its TEE provides (DESIGN §6).

- HPKE key pair (both suites) for run envelopes and sealed agent keys:
  :meth:`hivemind.envelope.HpkeKeyPair.from_seed` (labels ``runner-hpke|...``);
- Ed25519 receipt key: ``HKDF-SHA256(seed, salt="hivemind/v1", info="runner-sign|ed25519")``.

Every instance of one runner app gets the same seed from dstack KMS, so every instance holds the same
keys and any of them can take any run. Nothing here is ever serialized, and ``repr`` shows only the
public keys.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from hivemind.attestation import runner_key_binding
from hivemind.encoding import b64encode
from hivemind.envelope import RUNNER_KEY_SEED_BYTES, HpkeKeyPair, HpkePublicKeys, SealedEnvelope, open_sealed
from hivemind.errors import InvalidInput
from hivemind.keys import HKDF_SALT, public_bytes
from hivemind.receipt import Receipt, SignedReceipt, sign_receipt

RECEIPT_KEY_LABEL = b"runner-sign|ed25519"


class RunnerKeys:
    """The runner's private keys. Build with :meth:`from_seed`; use through the methods below."""

    __slots__ = ("_hpke", "_hpke_public", "_sign_key", "_sign_pub")

    def __init__(self, hpke: HpkeKeyPair, sign_key: Ed25519PrivateKey) -> None:
        self._hpke = hpke
        self._hpke_public = hpke.public_keys()
        self._sign_key = sign_key
        self._sign_pub = b64encode(public_bytes(sign_key))

    @classmethod
    def from_seed(cls, seed: bytes) -> RunnerKeys:
        if not isinstance(seed, bytes) or len(seed) != RUNNER_KEY_SEED_BYTES:
            raise InvalidInput(f"the runner key seed is {RUNNER_KEY_SEED_BYTES} bytes")
        sign_seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=HKDF_SALT, info=RECEIPT_KEY_LABEL).derive(
            seed
        )
        return cls(HpkeKeyPair.from_seed(seed), Ed25519PrivateKey.from_private_bytes(sign_seed))

    @property
    def hpke(self) -> HpkeKeyPair:
        """The HPKE private keys (for :func:`hivemind.envelope.open_run_envelope`)."""
        return self._hpke

    @property
    def hpke_public_keys(self) -> HpkePublicKeys:
        return self._hpke_public

    @property
    def sign_pub(self) -> str:
        """base64url Ed25519 public key that verifies this runner's receipts."""
        return self._sign_pub

    def report_data(self) -> bytes:
        """The 64 bytes the quote must carry: ``runner_key_binding`` of the published keys (§16.2)."""
        return runner_key_binding(self._hpke_public.by_suite(), self._sign_pub)

    def open(self, sealed: SealedEnvelope, *, info: bytes) -> bytes:
        """Open something sealed to the runner's HPKE keys (a sealed agent key, ...)."""
        return open_sealed(self._hpke, sealed, info=info)

    def sign_receipt(self, receipt: Receipt) -> SignedReceipt:
        return sign_receipt(receipt, self._sign_key)

    def __repr__(self) -> str:
        return f"RunnerKeys(sign_pub={self._sign_pub!r}, hpke_x25519={self._hpke_public.x25519!r})"
