"""The billing ledger's pure part: entry kinds, the hash chain, and whole-chain verification (DESIGN §11).

Each tenant has one append-only chain. Entry ``seq`` starts at 1 and has no gaps. An entry's hash is

    hash = SHA-256( bytes.fromhex(prev_hash) || JCS(entry without "hash") )

where the first entry's ``prev_hash`` is :data:`GENESIS_HASH` (64 zeros). Amounts are integer micro-USD:
``amount`` is the entry's effect on the balance and ``held_delta`` its effect on the amount held for
running work, so ``balance_after = previous balance + amount`` and ``held_after = previous held +
held_delta``. The store (``hivemind.store.billing``) appends entries; this module decides what a
valid entry and a valid chain are, so the verifier and the writer can never disagree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Annotated, Any, Self

from pydantic import Field, ValidationError, model_validator

from hivemind.canonical import canonical_json
from hivemind.errors import LedgerError
from hivemind.models import Sha256Hex, StrictModel, UnixSeconds

GENESIS_HASH = "0" * 64

# One trillion USD in micro-USD: far above any real amount, low enough that sums never lose precision.
MAX_AMOUNT = 10**18
Amount = Annotated[int, Field(ge=-MAX_AMOUNT, le=MAX_AMOUNT)]
HeldAmount = Annotated[int, Field(ge=0, le=MAX_AMOUNT)]
# What an entry refers to: a run id, "code:<hash>", an operator's note. No quotes or formula characters.
REF_PATTERN = r"^[A-Za-z0-9_.:#@/ -]{0,200}$"
LedgerRef = Annotated[str, Field(pattern=REF_PATTERN)]


class LedgerKind(StrEnum):
    CREDIT_GRANT = "credit_grant"
    CREDIT_CODE_REDEEM = "credit_code_redeem"
    USAGE_HOLD = "usage_hold"
    USAGE_RELEASE = "usage_release"
    USAGE_CHARGE = "usage_charge"
    ADJUSTMENT = "adjustment"


def effect_problem(kind: LedgerKind, amount: int, held_delta: int) -> str | None:
    """Why ``amount``/``held_delta`` are impossible for ``kind``, or ``None`` if they are fine.

    Grants and redemptions add, holds only hold, releases only release, charges only take, and
    adjustments move the balance either way; nothing but holds and releases touches ``held``.
    """
    if kind in (LedgerKind.CREDIT_GRANT, LedgerKind.CREDIT_CODE_REDEEM):
        ok = amount > 0 and held_delta == 0
        rule = "adds a positive amount and holds nothing"
    elif kind is LedgerKind.USAGE_HOLD:
        ok = amount == 0 and held_delta >= 0
        rule = "only increases the held amount"
    elif kind is LedgerKind.USAGE_RELEASE:
        ok = amount == 0 and held_delta <= 0
        rule = "only decreases the held amount"
    elif kind is LedgerKind.USAGE_CHARGE:
        ok = amount <= 0 and held_delta == 0
        rule = "only decreases the balance"
    else:
        ok = amount != 0 and held_delta == 0
        rule = "changes the balance by a non-zero amount and holds nothing"
    return None if ok else f"a {kind.value} entry {rule} (amount={amount}, held_delta={held_delta})"


class LedgerEntry(StrictModel):
    """One ledger line, as stored and as exported."""

    tenant_id: str = Field(min_length=1, max_length=80)
    seq: int = Field(ge=1)
    kind: LedgerKind
    amount: Amount
    held_delta: Amount
    ref: LedgerRef
    balance_after: Amount
    held_after: HeldAmount
    created_at: UnixSeconds
    prev_hash: Sha256Hex
    hash: Sha256Hex

    @model_validator(mode="after")
    def _kind_matches_effects(self) -> Self:
        problem = effect_problem(self.kind, self.amount, self.held_delta)
        if problem is not None:
            raise ValueError(problem)
        return self

    def hashed_fields(self) -> dict[str, Any]:
        """Everything the hash covers: the whole entry except ``hash`` itself."""
        return self.model_dump(mode="json", exclude={"hash"})


class Account(StrictModel):
    """A tenant's running totals; ``last_seq``/``last_hash`` pin the head of its ledger chain."""

    tenant_id: str = Field(min_length=1, max_length=80)
    balance: Amount = 0
    held: HeldAmount = 0
    last_seq: int = Field(default=0, ge=0)
    last_hash: Sha256Hex = GENESIS_HASH
    updated_at: UnixSeconds = 0

    @property
    def available(self) -> int:
        """What new holds may still take: balance minus what running work already holds."""
        return self.balance - self.held


def stored_entry(fields: Mapping[str, Any]) -> LedgerEntry:
    """Parse a ledger entry as read back from storage.

    No transaction writes an entry that breaks the model (``next_entry`` checks the same rules), so a
    stored one that does is tampering: :class:`LedgerError` naming the tenant and seq as far as the row
    says them, never pydantic's ``ValidationError``.
    """
    try:
        return LedgerEntry.model_validate(dict(fields))
    except ValidationError as exc:
        where = {
            name: fields[name]
            for name, kind in (("tenant_id", str), ("seq", int))
            if isinstance(fields.get(name), kind) and not isinstance(fields.get(name), bool)
        }
        raise LedgerError(
            f"tenant {where.get('tenant_id', '?')} seq {where.get('seq', '?')}: the stored entry is not a "
            f"valid ledger entry ({_problems(exc)})",
            details=where,
        ) from None


def stored_account(fields: Mapping[str, Any]) -> Account:
    """Parse an account as read back from storage; one that breaks the model is :class:`LedgerError`."""
    try:
        return Account.model_validate(dict(fields))
    except ValidationError as exc:
        tenant_id = fields.get("tenant_id")
        where = {"tenant_id": tenant_id} if isinstance(tenant_id, str) else {}
        raise LedgerError(
            f"tenant {where.get('tenant_id', '?')}: the stored account is not valid ({_problems(exc)})",
            details=where,
        ) from None


def _problems(exc: ValidationError) -> str:
    """The first few validation problems, without the offending values (they may be large)."""
    return "; ".join(
        f"{'.'.join(str(part) for part in error['loc']) or 'entry'}: {error['msg']}"
        for error in exc.errors(include_url=False, include_input=False)[:3]
    )


def entry_hash(prev_hash: str, entry_fields: Mapping[str, Any]) -> str:
    """``SHA-256(prev_hash bytes || JCS(entry_fields))`` as lowercase hex. Also used by the audit chain."""
    if "hash" in entry_fields:
        raise LedgerError("an entry's hash cannot cover its own hash field")
    try:
        prev = bytes.fromhex(prev_hash)
    except ValueError:
        raise LedgerError("prev_hash is not hex") from None
    if len(prev) != 32:
        raise LedgerError("prev_hash is not a SHA-256 hash")
    return hashlib.sha256(prev + canonical_json(dict(entry_fields))).hexdigest()


def next_entry(
    account: Account,
    *,
    kind: LedgerKind,
    amount: int,
    held_delta: int,
    ref: str,
    created_at: int,
) -> LedgerEntry:
    """The entry that follows ``account``'s chain head, with its totals and hash computed.

    Raises :class:`LedgerError` if the entry is impossible for its kind or would make ``held`` negative
    (releasing more than is held is always a bookkeeping bug, never something to clamp).
    """
    problem = effect_problem(kind, amount, held_delta)
    if problem is not None:
        raise LedgerError(problem, details={"tenant_id": account.tenant_id, "seq": account.last_seq + 1})
    held_after = account.held + held_delta
    if held_after < 0:
        raise LedgerError(
            f"tenant {account.tenant_id}: releasing {-held_delta} but only {account.held} is held",
            details={"tenant_id": account.tenant_id, "seq": account.last_seq + 1},
        )
    fields: dict[str, Any] = {
        "tenant_id": account.tenant_id,
        "seq": account.last_seq + 1,
        "kind": kind.value,
        "amount": amount,
        "held_delta": held_delta,
        "ref": ref,
        "balance_after": account.balance + amount,
        "held_after": held_after,
        "created_at": created_at,
        "prev_hash": account.last_hash,
    }
    return LedgerEntry(**fields, hash=entry_hash(account.last_hash, fields))


def account_after(account: Account, entry: LedgerEntry) -> Account:
    """``account`` with ``entry`` applied (the entry must be the one that follows its head)."""
    return account.model_copy(
        update={
            "balance": entry.balance_after,
            "held": entry.held_after,
            "last_seq": entry.seq,
            "last_hash": entry.hash,
            "updated_at": entry.created_at,
        }
    )


def verify_chain(entries: Iterable[LedgerEntry], account: Account | None = None) -> int:
    """Check one tenant's whole chain, from seq 1, in order; return the number of entries.

    Each step is checked on its own and the first failure raises :class:`LedgerError` naming the
    tenant and seq: wrong tenant, gap or reordering, broken ``prev_hash`` link, hash that does not match
    the contents, totals that do not recompute. With ``account``, the chain's head and final totals must
    equal the stored account (so a deleted tail entry or an edited balance is caught too).
    """
    tenant_id = account.tenant_id if account is not None else None
    expected_seq = 1
    prev_hash = GENESIS_HASH
    balance = 0
    held = 0
    for entry in entries:
        where = {"tenant_id": entry.tenant_id, "seq": entry.seq}
        if tenant_id is None:
            tenant_id = entry.tenant_id
        if entry.tenant_id != tenant_id:
            raise LedgerError(
                f"seq {entry.seq} belongs to tenant {entry.tenant_id}, not {tenant_id}", details=where
            )
        if entry.seq != expected_seq:
            raise LedgerError(
                f"tenant {tenant_id}: expected seq {expected_seq}, found seq {entry.seq} (gap or reordering)",
                details=where,
            )
        if entry.prev_hash != prev_hash:
            raise LedgerError(
                f"tenant {tenant_id} seq {entry.seq}: prev_hash does not link to seq {entry.seq - 1}",
                details=where,
            )
        if entry_hash(entry.prev_hash, entry.hashed_fields()) != entry.hash:
            raise LedgerError(
                f"tenant {tenant_id} seq {entry.seq}: hash does not match the entry", details=where
            )
        balance += entry.amount
        held += entry.held_delta
        if entry.balance_after != balance or entry.held_after != held:
            raise LedgerError(
                f"tenant {tenant_id} seq {entry.seq}: totals do not recompute (stored balance "
                f"{entry.balance_after} held {entry.held_after}, recomputed {balance} and {held})",
                details=where,
            )
        prev_hash = entry.hash
        expected_seq += 1
    count = expected_seq - 1
    if account is not None:
        head = {"tenant_id": account.tenant_id, "seq": account.last_seq}
        if account.last_seq != count or account.last_hash != prev_hash:
            raise LedgerError(
                f"tenant {account.tenant_id}: account head is seq {account.last_seq} but the chain ends at "
                f"seq {count} (or its hash differs)",
                details=head,
            )
        if account.balance != balance or account.held != held:
            raise LedgerError(
                f"tenant {account.tenant_id}: account says balance {account.balance} held {account.held}, "
                f"the ledger recomputes to {balance} and {held}",
                details=head,
            )
    return count
