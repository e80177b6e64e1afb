"""Runs on the client (DESIGN §7): seal and submit, follow, open and verify the output, stats.

1. :func:`submit_run`: a fresh X25519 reply key; the run envelope ``{room_id, manifest_hash, bearer_id,
   wrap_key, prompt, reply_pub, budgets, nonce, expires_at}`` HPKE-sealed to the verified runner;
   ``POST /v1/rooms/{id}/runs`` with the prompt's hash. The reply key is kept in the profile's
   :class:`~hmctl.profiles.RunTicket` (0600) so the output can be fetched later.
2. ``ApiClient.wait_for_run`` long-polls until the run ends.
3. :func:`open_run_output`: download the sealed output (hashing it), open the output key with the reply
   key (or the owner's box key), decrypt, and verify the receipt against the runner key taken from a
   verified attestation: run, room, manifest, prompt, output ciphertext and plaintext hashes and the
   runner build. Nothing is returned unverified.
"""

from __future__ import annotations

import io
import statistics
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from hivemind.encoding import b64decode, b64encode
from hivemind.envelope import (
    HpkePublicKeys,
    OutputRecipient,
    RunEnvelope,
    SealedEnvelope,
    open_output_key,
    seal_run_envelope,
)
from hivemind.errors import EnvelopeError, ReceiptError
from hivemind.keys import public_bytes, wrap_key
from hivemind.models import Budgets, ObjectKind, RunStatus
from hivemind.receipt import Receipt, ReceiptExpectations, SignedReceipt, verify_artifact, verify_receipt
from hivemind.seal import SealContext, open_stream
from hivemind.tokens import random_id
from hmctl.client import ApiClient
from hmctl.errors import UsageError
from hmctl.profiles import RunTicket, RunTickets
from hmctl.rooms import CheckedRoom, bearer_of

# An output is an answer, held in memory to print it; bulk results travel as artifacts (streamed to files).
MAX_OUTPUT_BYTES = 64 * 1024 * 1024
_SPOOL_BYTES = 16 * 1024 * 1024


# --- submitting -------------------------------------------------------------------------------------


def submit_run(
    api: ApiClient,
    room: CheckedRoom,
    prompt: str,
    *,
    tenant_id: str | None,
    budgets: Budgets | None,
    query_agent_id: str | None,
    tickets: RunTickets,
    now: int,
) -> RunTicket:
    """Seal the run envelope to the chosen runner and submit it; the ticket is saved before returning."""
    access = room.access
    manifest = room.manifest
    reply_key = X25519PrivateKey.generate()
    envelope = RunEnvelope.create(
        room_id=access.room_id,
        manifest_hash=room.signed.manifest_hash,
        bearer_id=bearer_of(access, tenant_id),
        wrap_key=wrap_key(access.secret, access.room_id),
        prompt=prompt,
        reply_pub=public_bytes(reply_key),
        budgets=budgets or manifest.budgets.defaults,
        now=now,
        query_agent_id=query_agent_id,
    )
    sealed = seal_run_envelope(HpkePublicKeys.from_suites(room.runner.hpke_public_keys), envelope)
    body: dict[str, Any] = {
        "envelope": sealed.model_dump(mode="json"),
        "runner_id": room.runner.runner_id,
        "prompt_sha256": envelope.prompt_sha256(),
        "idempotency_key": random_id("idem", 16),
    }
    if budgets is not None:
        body["budgets"] = budgets.model_dump()
    if query_agent_id is not None:
        body["query_agent_id"] = query_agent_id
    submitted = api.post(f"/v1/rooms/{access.room_id}/runs", body)
    ticket = RunTicket(
        run_id=submitted["run_id"],
        room_id=access.room_id,
        service=access.service,
        link=access.link,
        reply_key=b64encode(reply_key.private_bytes_raw()),
        owner_tenant_id=manifest.tenant_id,
        manifest_hash=room.signed.manifest_hash,
        prompt_sha256=envelope.prompt_sha256(),
        runner_id=room.runner.runner_id,
        runner_sign_pub=room.runner.sign_pub,
        allowed_compose_hashes=room.allowed_compose_hashes,
        attestation_skipped=room.attestation_skipped,
        created_at=now,
    )
    tickets.put(ticket.run_id, ticket)
    return ticket


# --- opening and verifying the output ---------------------------------------------------------------


@dataclass(frozen=True)
class OutputKeyHolder:
    """Who opens the output key: the querier's reply key, or the owner's box key."""

    private_key: X25519PrivateKey = field(repr=False)
    recipient: OutputRecipient

    @classmethod
    def querier(cls, ticket: RunTicket) -> OutputKeyHolder:
        key = X25519PrivateKey.from_private_bytes(b64decode(ticket.reply_key))
        return cls(private_key=key, recipient=OutputRecipient.QUERIER)


@dataclass(frozen=True)
class Expected:
    """What the client knows independently of the service about a run (for the receipt check)."""

    run_id: str
    room_id: str
    owner_tenant_id: str
    manifest_hash: str
    prompt_sha256: str | None  # None: an owner, who never saw the prompt
    attested_sign_pub: str
    allowed_compose_hashes: Sequence[str]

    @classmethod
    def of_ticket(cls, ticket: RunTicket) -> Expected:
        return cls(
            run_id=ticket.run_id,
            room_id=ticket.room_id,
            owner_tenant_id=ticket.owner_tenant_id,
            manifest_hash=ticket.manifest_hash,
            prompt_sha256=ticket.prompt_sha256,
            attested_sign_pub=ticket.runner_sign_pub,
            allowed_compose_hashes=ticket.allowed_compose_hashes,
        )


@dataclass(frozen=True)
class RunOutcome:
    """A finished run whose receipt verified; ``output`` is set for a completed run."""

    run_id: str
    status: RunStatus
    receipt: Receipt
    signature: str
    output: bytes | None = field(repr=False)
    output_key: bytes | None = field(repr=False)
    artifacts: list[dict[str, Any]]

    def as_dict(self, *, attestation_skipped: bool) -> dict[str, Any]:
        text, encoding = _printable_output(self.output)
        result: dict[str, Any] = {
            "run_id": self.run_id,
            "status": self.status.value,
            "output": text,
            "verified": True,
            "receipt": self.receipt.model_dump(mode="json"),
            "receipt_signature": self.signature,
            "attestation_skipped": attestation_skipped,
            "error_code": self.receipt.error_code,
        }
        if encoding != "utf-8":
            result["output_encoding"] = encoding
        return result


def _printable_output(output: bytes | None) -> tuple[str | None, str]:
    if output is None:
        return None, "utf-8"
    try:
        return output.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return b64encode(output), "base64url"


def _parse_receipt(document: Any) -> SignedReceipt:
    if document is None:
        raise ReceiptError("the service sent no receipt for this run", details={"field": "receipt"})
    try:
        return SignedReceipt.model_validate(document)
    except ValueError as exc:
        raise ReceiptError(f"the service sent a malformed receipt: {exc.__class__.__name__}") from None


def _expectations(
    expected: Expected, signed: SignedReceipt, ciphertext_sha256: str | None, plaintext_sha256: str | None
) -> ReceiptExpectations:
    return ReceiptExpectations(
        run_id=expected.run_id,
        room_id=expected.room_id,
        manifest_hash=expected.manifest_hash,
        # An owner never saw the prompt, so it cannot check its hash; a querier always does.
        prompt_sha256=expected.prompt_sha256 or signed.receipt.prompt_sha256,
        output_ciphertext_sha256=ciphertext_sha256,
        output_plaintext_sha256=plaintext_sha256,
        allowed_compose_hashes=frozenset(expected.allowed_compose_hashes),
    )


def open_run_output(
    api: ApiClient,
    output_view: Mapping[str, Any],
    *,
    expected: Expected,
    holder: OutputKeyHolder | None,
) -> RunOutcome:
    """Download, decrypt and verify a finished run's output (``GET /v1/runs/{id}/output`` answer).

    In order: the receipt's signature and fields against what the client knows, with the hash of the
    downloaded ciphertext; then the output key is opened and the output decrypted (HMS1, bound to the
    room, the run and the kind ``output``); then the plaintext hash. ``holder=None`` verifies only the
    receipt (an owner of a querier-only room sees no output).
    """
    signed = _parse_receipt(output_view.get("receipt"))
    status = RunStatus(output_view.get("status"))
    url = output_view.get("output_url")
    if status is not RunStatus.COMPLETED or holder is None:
        receipt = verify_receipt(
            signed,
            attested_sign_pub=expected.attested_sign_pub,
            expected=_expectations(expected, signed, None, None),
        )
        return _outcome(
            expected,
            status=status,
            receipt=receipt,
            signed=signed,
            output=None,
            output_key=None,
            output_view=output_view,
        )
    if not url or output_view.get("sealed_output_key") is None:
        raise ReceiptError("the run completed but the service offers no output to download")
    with tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES) as sealed:
        ciphertext_sha256 = api.download(str(url), sealed, max_bytes=MAX_OUTPUT_BYTES)  # type: ignore[arg-type]
        verify_receipt(
            signed,
            attested_sign_pub=expected.attested_sign_pub,
            expected=_expectations(expected, signed, ciphertext_sha256, None),
        )
        sealed_key = _sealed_key(output_view["sealed_output_key"])
        output_key = open_output_key(
            holder.private_key, sealed_key, run_id=expected.run_id, recipient=holder.recipient
        )
        sealed.seek(0)
        plaintext = io.BytesIO()
        stats = open_stream(sealed, plaintext, key=output_key, context=output_context(expected))  # type: ignore[arg-type]
    receipt = verify_receipt(
        signed,
        attested_sign_pub=expected.attested_sign_pub,
        expected=_expectations(expected, signed, ciphertext_sha256, stats.plaintext_sha256),
    )
    return _outcome(
        expected,
        status=status,
        receipt=receipt,
        signed=signed,
        output=plaintext.getvalue(),
        output_key=output_key,
        output_view=output_view,
    )


def _sealed_key(document: Any) -> SealedEnvelope:
    try:
        return SealedEnvelope.model_validate(document)
    except ValueError:
        raise EnvelopeError("the service sent a malformed sealed output key") from None


def output_context(expected: Expected) -> SealContext:
    return SealContext(
        tenant_id=expected.owner_tenant_id,
        room_id=expected.room_id,
        kind=ObjectKind.OUTPUT,
        object_id=expected.run_id,
    )


def _outcome(
    expected: Expected,
    *,
    status: RunStatus,
    receipt: Receipt,
    signed: SignedReceipt,
    output: bytes | None,
    output_key: bytes | None,
    output_view: Mapping[str, Any],
) -> RunOutcome:
    if receipt.status is not status:
        raise ReceiptError(
            f"the service says the run is {status.value}, its signed receipt says {receipt.status.value}",
            details={"field": "status"},
        )
    return RunOutcome(
        run_id=expected.run_id,
        status=status,
        receipt=receipt,
        signature=signed.signature,
        output=output,
        output_key=output_key,
        artifacts=list(output_view.get("artifacts") or []),
    )


def save_artifacts(
    api: ApiClient, outcome: RunOutcome, expected: Expected, directory: Path, *, names: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """Download, decrypt and verify each artifact (or those ``names``) into ``directory``.

    Each is checked against the verified receipt (:func:`hivemind.receipt.verify_artifact`) before it
    is moved into place, so a file in ``directory`` is always a verified one.
    """
    if outcome.output_key is None:
        raise UsageError("this run has no output this profile can open, so it has no artifacts for it")
    wanted = set(names)
    directory.mkdir(parents=True, exist_ok=True)
    saved: list[dict[str, Any]] = []
    for link in outcome.artifacts:
        name = str(link["name"])
        if wanted and name not in wanted:
            continue
        context = SealContext(
            tenant_id=expected.owner_tenant_id,
            room_id=expected.room_id,
            kind=ObjectKind.ARTIFACT,
            object_id=name,
        )
        with (
            tempfile.TemporaryFile() as sealed,
            tempfile.NamedTemporaryFile(dir=directory, delete=False) as plain,
        ):
            try:
                ciphertext_sha256 = api.download(str(link["url"]), sealed)
                sealed.seek(0)
                stats = open_stream(sealed, plain, key=outcome.output_key, context=context)
                verify_artifact(
                    outcome.receipt,
                    name,
                    ciphertext_sha256=ciphertext_sha256,
                    plaintext_sha256=stats.plaintext_sha256,
                )
            except BaseException:
                Path(plain.name).unlink(missing_ok=True)
                raise
        target = directory / name
        Path(plain.name).replace(target)
        saved.append(
            {
                "name": name,
                "path": str(target),
                "size": stats.plaintext_size,
                "sha256": stats.plaintext_sha256,
            }
        )
    missing = wanted - {entry["name"] for entry in saved}
    if missing:
        raise UsageError(f"the run has no artifact named {', '.join(sorted(missing))}")
    return saved


# --- stats ------------------------------------------------------------------------------------------


def _percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    # Linear interpolation between closest ranks (the "inclusive" method).
    return statistics.quantiles(ordered, n=100, method="inclusive")[round(fraction * 100) - 1]


def run_stats(runs: Sequence[Mapping[str, Any]], charges: Mapping[str, int] | None) -> dict[str, Any]:
    """Per-stage p50/p95 seconds, tool calls by name, LLM calls, tokens and cost over ``runs``.

    ``runs`` are run views (their ``usage`` is what the runner recorded per stage); ``charges`` maps run
    ids to the micro-USD charged for them (``None``: cost unknown to this caller).
    """
    durations: dict[str, list[float]] = {}
    tools: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    llm_calls = prompt_tokens = completion_tokens = 0
    for run in runs:
        statuses[str(run.get("status"))] += 1
        for usage in run.get("usage") or []:
            durations.setdefault(str(usage["stage"]), []).append(int(usage.get("duration_ms", 0)) / 1000)
            tools.update({str(name): int(count) for name, count in (usage.get("tool_calls") or {}).items()})
            llm_calls += int(usage.get("llm_calls", 0))
            prompt_tokens += int(usage.get("prompt_tokens", 0))
            completion_tokens += int(usage.get("completion_tokens", 0))
    stages = {
        stage: {
            "runs": len(values),
            "p50_s": round(_percentile(values, 0.50), 3),
            "p95_s": round(_percentile(values, 0.95), 3),
        }
        for stage, values in durations.items()
    }
    cost: int | None = None
    if charges is not None:
        cost = sum(charges.get(str(run.get("run_id")), 0) for run in runs)
    return {
        "runs": len(runs),
        "statuses": dict(statuses),
        "stages": {name: stages[name] for name in ("scope", "query", "mediator") if name in stages},
        "tool_calls": dict(tools.most_common()),
        "llm_calls": llm_calls,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "cost_micro_usd": cost,
    }


def charges_by_run(entries: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Micro-USD charged per run, from the caller's ledger entries (``usage_charge``, ref = run id)."""
    charges: dict[str, int] = {}
    for entry in entries:
        if entry.get("kind") == "usage_charge":
            ref = str(entry.get("ref"))
            charges[ref] = charges.get(ref, 0) - int(entry.get("amount", 0))
    return charges
