"""Run receipts: what the attested runner signs about one run (DESIGN §7 step 5, §16.3).

A receipt covers everything that shaped the output: the room's manifest hash, the runner's compose and
quote hashes, every agent's source and image digests, the scope policy hash, the prompt hash, the output
and artifact hashes (ciphertext and plaintext), the error code and the usage per stage. The runner signs
it with Ed25519 over ``b"hivemind-receipt-v1\\n" + JCS(receipt)`` using the key bound into its quote.

A client accepts a receipt only through :func:`verify_receipt`, against the key it took from a verified
attestation, never the ``signer_pub`` the receipt names about itself.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import Field, ValidationError, field_validator, model_validator

from hivemind.canonical import canonical_json, refuse_floats
from hivemind.encoding import b64decode, b64encode
from hivemind.envelope import RoomId
from hivemind.errors import InvalidInput, ReceiptError
from hivemind.keys import public_bytes
from hivemind.models import (
    Ed25519PublicB64,
    Ed25519SignatureB64,
    Identifier,
    RunStatus,
    Sha256Hex,
    Stage,
    StageUsage,
    StrictModel,
    UnixSeconds,
)

RECEIPT_VERSION = 1
RECEIPT_SIGNING_CONTEXT = b"hivemind-receipt-v1\n"

ImageDigest = Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")]
ArtifactName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
ErrorCode = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")]


class ReceiptAgent(StrictModel):
    """One stage's agent. ``image_digest`` is what the sandbox ran: the Docker image ID, or for the process
    backend a digest over the base rootfs tarball, the SDK and the source digest (docs/sandbox.md). The
    format admits ``None``; both of the runner's backends always set it."""

    stage: Stage
    agent_id: Identifier
    source_digest: Sha256Hex
    image_digest: ImageDigest | None


class OutputDigests(StrictModel):
    ciphertext_sha256: Sha256Hex  # of the HMS1 object as stored
    plaintext_sha256: Sha256Hex  # of the decrypted output


class ArtifactDigests(StrictModel):
    name: ArtifactName
    ciphertext_sha256: Sha256Hex
    plaintext_sha256: Sha256Hex


class UsageTotals(StrictModel):
    """Sums over the stages; signed so billing reads one figure per run."""

    duration_ms: int = Field(ge=0)
    tool_calls: int = Field(ge=0)
    llm_calls: int = Field(ge=0)
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)

    @classmethod
    def of(cls, usage: list[StageUsage]) -> UsageTotals:
        return cls(
            duration_ms=sum(stage.duration_ms for stage in usage),
            tool_calls=sum(sum(stage.tool_calls.values()) for stage in usage),
            llm_calls=sum(stage.llm_calls for stage in usage),
            prompt_tokens=sum(stage.prompt_tokens for stage in usage),
            completion_tokens=sum(stage.completion_tokens for stage in usage),
        )


class Receipt(StrictModel):
    """Receipt version 1. A completed run has an output and no error code; a failed run the opposite."""

    version: Literal[1] = RECEIPT_VERSION
    run_id: Identifier
    status: Literal[RunStatus.COMPLETED, RunStatus.FAILED]
    room_id: RoomId
    manifest_hash: Sha256Hex
    compose_hash: Sha256Hex
    quote_hash: Sha256Hex
    agents: list[ReceiptAgent] = Field(max_length=3)
    scope_policy_hash: Sha256Hex | None
    prompt_sha256: Sha256Hex
    output: OutputDigests | None
    artifacts: list[ArtifactDigests] = Field(max_length=256)
    error_code: ErrorCode | None
    usage: list[StageUsage] = Field(max_length=3)
    totals: UsageTotals
    started_at: UnixSeconds
    finished_at: UnixSeconds
    signer_pub: Ed25519PublicB64

    @model_validator(mode="before")
    @classmethod
    def _no_floats(cls, data: Any) -> Any:
        return refuse_floats(data)

    @field_validator("agents", "usage")
    @classmethod
    def _one_per_stage(cls, entries: list[Any]) -> list[Any]:
        stages = [entry.stage for entry in entries]
        if len(set(stages)) != len(stages):
            raise ValueError("lists a stage twice")
        return entries

    @field_validator("artifacts")
    @classmethod
    def _unique_artifacts(cls, artifacts: list[ArtifactDigests]) -> list[ArtifactDigests]:
        names = [artifact.name for artifact in artifacts]
        if len(set(names)) != len(names):
            raise ValueError("lists an artifact name twice")
        return artifacts

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.status is RunStatus.COMPLETED:
            if self.output is None or self.error_code is not None or self.scope_policy_hash is None:
                raise ValueError("a completed run has an output, a scope policy hash and no error code")
        elif self.error_code is None or self.output is not None or self.artifacts:
            raise ValueError("a failed run has an error code and no output or artifacts")
        if self.totals != UsageTotals.of(self.usage):
            raise ValueError("totals are not the sums of usage")
        if self.finished_at < self.started_at:
            raise ValueError("finished_at is before started_at")
        return self

    def signing_bytes(self) -> bytes:
        return RECEIPT_SIGNING_CONTEXT + canonical_json(self)


class SignedReceipt(StrictModel):
    receipt: Receipt
    signature: Ed25519SignatureB64

    def to_json(self) -> str:
        return canonical_json(self).decode()

    @classmethod
    def from_json(cls, text: str | bytes) -> SignedReceipt:
        """Parse a stored receipt; malformed input raises :class:`ReceiptError`."""
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"]) or "$"
            raise ReceiptError(f"not a valid signed receipt: {where}: {error['msg']}") from None


def sign_receipt(receipt: Receipt, runner_sign_key: Ed25519PrivateKey) -> SignedReceipt:
    """Runner side: sign with the attested receipt key, whose public half is ``receipt.signer_pub``."""
    if b64encode(public_bytes(runner_sign_key)) != receipt.signer_pub:
        raise InvalidInput("the signing key is not the receipt's signer_pub")
    return SignedReceipt(receipt=receipt, signature=b64encode(runner_sign_key.sign(receipt.signing_bytes())))


class ReceiptExpectations(StrictModel):
    """What the client knows independently of the receipt. Output hashes are ``None`` only when the
    client did not download the output (e.g. an owner of a ``querier_only`` room reading run metadata).
    """

    run_id: Identifier
    room_id: RoomId
    manifest_hash: Sha256Hex
    prompt_sha256: Sha256Hex
    output_ciphertext_sha256: Sha256Hex | None
    output_plaintext_sha256: Sha256Hex | None
    # Compose hashes the client accepted for this room (its runner_trust, checked at attestation).
    allowed_compose_hashes: frozenset[Sha256Hex] = Field(min_length=1)

    @model_validator(mode="after")
    def _plaintext_needs_ciphertext(self) -> Self:
        if self.output_plaintext_sha256 is not None and self.output_ciphertext_sha256 is None:
            raise ValueError("a plaintext hash is checked together with the ciphertext hash it came from")
        return self


def _mismatch(field: str, message: str) -> ReceiptError:
    return ReceiptError(f"receipt {field}: {message}", details={"field": field})


def _check_equal(field: str, recorded: str, expected: str) -> None:
    if recorded != expected:
        raise _mismatch(field, f"receipt records {recorded}, expected {expected}")


def verify_receipt(
    signed: SignedReceipt, *, attested_sign_pub: str, expected: ReceiptExpectations
) -> Receipt:
    """Verify a receipt, step by step; each failure is a :class:`ReceiptError` naming the field.

    1. the signature verifies under the *attested* key, and ``signer_pub`` is that key (a receipt
       signed by any other key is refused even if it is self-consistent);
    2. run id, room id, manifest hash and prompt hash are the ones the client sent;
    3. output ciphertext hash, then output plaintext hash (after the client decrypted), when given;
    4. the runner's compose hash is one the client accepted.
    """
    receipt = signed.receipt
    try:
        attested_key = Ed25519PublicKey.from_public_bytes(b64decode(attested_sign_pub))
    except (InvalidInput, ValueError):
        raise InvalidInput("the attested signing key is not a base64url Ed25519 public key") from None
    try:
        attested_key.verify(b64decode(signed.signature), receipt.signing_bytes())
    except InvalidSignature:
        raise _mismatch(
            "signature", "does not verify under the attested runner key (another signer, or tampered)"
        ) from None
    if receipt.signer_pub != attested_sign_pub:
        raise _mismatch(
            "signer_pub", f"names {receipt.signer_pub}, but the attested key is {attested_sign_pub}"
        )

    _check_equal("run_id", receipt.run_id, expected.run_id)
    _check_equal("room_id", receipt.room_id, expected.room_id)
    _check_equal("manifest_hash", receipt.manifest_hash, expected.manifest_hash)
    _check_equal("prompt_sha256", receipt.prompt_sha256, expected.prompt_sha256)

    if expected.output_ciphertext_sha256 is not None:
        if receipt.output is None:
            raise _mismatch("output", f"the run {receipt.status} without an output, but one was downloaded")
        _check_equal(
            "output.ciphertext_sha256", receipt.output.ciphertext_sha256, expected.output_ciphertext_sha256
        )
        if expected.output_plaintext_sha256 is not None:
            _check_equal(
                "output.plaintext_sha256", receipt.output.plaintext_sha256, expected.output_plaintext_sha256
            )

    if receipt.compose_hash not in expected.allowed_compose_hashes:
        raise _mismatch("compose_hash", f"runner build {receipt.compose_hash} is not one this room allows")
    return receipt


def verify_artifact(receipt: Receipt, name: str, *, ciphertext_sha256: str, plaintext_sha256: str) -> None:
    """Check a downloaded artifact against a receipt that :func:`verify_receipt` already accepted."""
    recorded = next((artifact for artifact in receipt.artifacts if artifact.name == name), None)
    if recorded is None:
        raise _mismatch("artifacts", f"the run recorded no artifact named {name!r}")
    _check_equal(f"artifacts[{name}].ciphertext_sha256", recorded.ciphertext_sha256, ciphertext_sha256)
    _check_equal(f"artifacts[{name}].plaintext_sha256", recorded.plaintext_sha256, plaintext_sha256)
