"""Accounts, the hash-chained ledger, run holds and settlements, credit codes, daily export (DESIGN §11).

Every balance change is ONE DynamoDB transaction that

1. puts the next ledger entry (or entries), each conditional on its ``seq`` not existing;
2. updates the account to the new totals and chain head, conditional on ``last_seq`` still being the
   head that was read (and, for a hold with credits enforced, on ``available >= hold``);
3. writes the operation's marker, conditional on its state (a hold per run, a settlement per run, one
   redemption per tenant and code, an idempotency key), so a retried or redelivered operation cannot
   apply twice.

Two concurrent writers read the same head; one commits, the other's condition fails, it re-reads and
retries (bounded). The re-read tells a seq race apart from a real lack of credit. Hence concurrent holds
can never overdraw and the chain has no gaps. ``available`` is stored next to ``balance`` and ``held``
because condition expressions cannot subtract.
"""

from __future__ import annotations

import csv
import io
import random
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Any

from pydantic import Field

from hivemind.errors import (
    Conflict,
    Forbidden,
    Gone,
    InsufficientCredit,
    InvalidInput,
    LedgerError,
    NotFound,
    ServiceUnavailable,
)
from hivemind.ledger import (
    REF_PATTERN,
    Account,
    LedgerEntry,
    LedgerKind,
    account_after,
    effect_problem,
    next_entry,
    stored_account,
    stored_entry,
    verify_chain,
)
from hivemind.models import Sha256Hex, StrictModel, UnixSeconds
from hivemind.store.base import Clock, ConditionFailed, Page, Record, Table, TransactionCancelled, transact
from hivemind.store.blobs import BlobStore, StoredObject
from hivemind.store.config import AwsClients
from hivemind.store.schema import LEDGER_BY_DAY, TableRole, ledger_export_key

_MAX_ATTEMPTS = 24
_REF = re.compile(REF_PATTERN)
_IDEMPOTENCY_KEY = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
EXPORT_COLUMNS = (
    "tenant_id",
    "seq",
    "kind",
    "amount",
    "held_delta",
    "ref",
    "balance_after",
    "held_after",
    "created_at",
    "prev_hash",
    "hash",
)


class HoldState(StrEnum):
    HELD = "held"
    SETTLED = "settled"


class RunHold(Record):
    """The hold taken for one run, and how it was settled."""

    run_id: str = Field(min_length=1, max_length=80)
    tenant_id: str = Field(min_length=1, max_length=80)
    amount: int = Field(ge=0)
    state: HoldState = HoldState.HELD
    hold_seq: int = Field(ge=1)
    charged: int | None = Field(default=None, ge=0)
    settle_seq: int | None = None
    created_at: UnixSeconds
    settled_at: UnixSeconds | None = None


class Settlement(StrictModel):
    hold: RunHold
    # False when the run was already settled (a redelivered settlement): nothing changed.
    applied: bool
    entries: list[LedgerEntry] = Field(default_factory=list)


class CreditCode(Record):
    code_hash: Sha256Hex
    credit: int = Field(gt=0, description="micro-USD granted per redemption")
    max_uses: int = Field(ge=1)
    uses: int = Field(default=0, ge=0)
    expires_at: UnixSeconds
    revoked: bool = False
    created_by: str = Field(min_length=1, max_length=80)
    created_at: UnixSeconds
    note: str | None = Field(default=None, max_length=200)


@dataclass(frozen=True, slots=True)
class _Change:
    kind: LedgerKind
    amount: int
    held_delta: int
    ref: str


class _MarkerConditionFailed(Exception):
    """One of the operation's own conditions (not the ledger's) failed; ``indexes`` says which."""

    def __init__(self, indexes: set[int]) -> None:
        super().__init__(indexes)
        self.indexes = indexes


def _day(created_at: int) -> str:
    return datetime.fromtimestamp(created_at, tz=UTC).date().isoformat()


def _csv_cell(value: str) -> str:
    # Spreadsheets execute cells that start with these characters (CSV formula injection).
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


class BillingRepository:
    def __init__(self, clients: AwsClients, clock: Clock, blobs: BlobStore) -> None:
        self._clients = clients
        self._clock = clock
        self._blobs = blobs
        self._accounts = Table(clients, TableRole.ACCOUNTS)
        self._ledger = Table(clients, TableRole.LEDGER)
        self._markers = Table(clients, TableRole.BILLING_MARKERS)
        self._codes = Table(clients, TableRole.CREDIT_CODES)

    # --- accounts and the ledger -----------------------------------------------------------------

    def account(self, tenant_id: str) -> Account:
        """The tenant's account; a tenant that never had an entry has an all-zero account."""
        item = self._accounts.get({"tenant_id": tenant_id})
        if item is None:
            return Account(tenant_id=tenant_id)
        return _account_from_item(item)

    def apply(
        self,
        tenant_id: str,
        kind: LedgerKind,
        amount: int,
        held_delta: int,
        ref: str,
        *,
        require_available: int | None = None,
    ) -> LedgerEntry:
        """Append one entry and update the account in one transaction (see the module docstring).

        With ``require_available``, refuses with :class:`InsufficientCredit` unless the account has at
        least that much available (balance minus held) when the entry is written.
        """
        return self._commit(
            tenant_id, [_Change(kind, amount, held_delta, ref)], require_available=require_available
        )[0]

    def grant(
        self, tenant_id: str, amount: int, *, ref: str = "grant", idempotency_key: str | None = None
    ) -> LedgerEntry:
        """Add credit. With ``idempotency_key``, repeating the grant returns the first entry."""
        return self._with_idempotency(
            tenant_id, idempotency_key, _Change(LedgerKind.CREDIT_GRANT, amount, 0, ref)
        )

    def adjust(
        self, tenant_id: str, amount: int, *, note: str, idempotency_key: str | None = None
    ) -> LedgerEntry:
        """An operator's correction (either sign), with a note saying why."""
        if not note.strip():
            raise InvalidInput("an adjustment needs a note")
        return self._with_idempotency(
            tenant_id, idempotency_key, _Change(LedgerKind.ADJUSTMENT, amount, 0, note)
        )

    def list_ledger(
        self, tenant_id: str, *, cursor: str | None = None, limit: int = 100
    ) -> Page[LedgerEntry]:
        items, next_cursor = self._ledger.query(
            key_condition="tenant_id = :tenant",
            values={":tenant": tenant_id},
            scope={"tenant_id": tenant_id},
            cursor=cursor,
            limit=limit,
        )
        return Page[LedgerEntry](items=[_entry_from_item(item) for item in items], cursor=next_cursor)

    def entries(self, tenant_id: str, *, up_to_seq: int | None = None) -> Iterator[LedgerEntry]:
        """The tenant's chain in seq order (up to and including ``up_to_seq`` when given)."""
        key_condition = "tenant_id = :tenant"
        values: dict[str, Any] = {":tenant": tenant_id}
        if up_to_seq is not None:
            key_condition += " AND seq <= :head"
            values[":head"] = up_to_seq
        for item in self._ledger.query_all(
            key_condition=key_condition, values=values, scope={"tenant_id": tenant_id}
        ):
            yield _entry_from_item(item)

    def verify(self, tenant_id: str) -> int:
        """Recompute the tenant's chain and balances against its account; returns the entry count."""
        return self._verify_account(self.account(tenant_id))

    def _verify_account(self, account: Account) -> int:
        # The account is read first and the chain up to its head, so appends made meanwhile do not
        # disturb the snapshot. An entry past the head that the account still does not know about
        # afterwards was not written by a transaction: that is tampering, not a race.
        count = verify_chain(self.entries(account.tenant_id, up_to_seq=account.last_seq), account)
        beyond, _ = self._ledger.query(
            key_condition="tenant_id = :tenant AND seq > :head",
            values={":tenant": account.tenant_id, ":head": account.last_seq},
            scope={"tenant_id": account.tenant_id},
            limit=1,
        )
        if beyond and self.account(account.tenant_id).last_seq < beyond[0]["seq"]:
            raise LedgerError(
                f"tenant {account.tenant_id}: seq {beyond[0]['seq']} lies beyond the account head",
                details={"tenant_id": account.tenant_id, "seq": beyond[0]["seq"]},
            )
        return count

    def list_accounts(self, *, cursor: str | None = None, limit: int = 100) -> Page[Account]:
        """Operator listing of every account (a paginated scan; not a request path)."""
        items, next_cursor = self._accounts.scan_page(cursor=cursor, limit=limit)
        return Page[Account](
            items=[_account_from_item(item) for item in items],
            cursor=next_cursor,
        )

    def verify_all(self) -> dict[str, int]:
        """Verify every tenant's chain; returns entries per tenant or raises on the first bad one."""
        counts: dict[str, int] = {}
        cursor: str | None = None
        while True:
            page = self.list_accounts(cursor=cursor)
            for account in page.items:
                counts[account.tenant_id] = self._verify_account(account)
            if page.cursor is None:
                return counts
            cursor = page.cursor

    # --- run holds -------------------------------------------------------------------------------

    def hold(self, tenant_id: str, run_id: str, amount: int, *, enforce: bool) -> RunHold:
        """Hold ``amount`` for ``run_id``. With ``enforce``, :class:`InsufficientCredit` unless that much
        is available. Repeating the same hold returns it; a different hold for the run is a conflict."""
        if amount < 0:
            raise InvalidInput("a hold is never negative")
        existing = self.get_hold(run_id)
        if existing is None:
            now = self._clock()

            def marker(entries: list[LedgerEntry]) -> list[dict[str, Any]]:
                record = RunHold(
                    run_id=run_id, tenant_id=tenant_id, amount=amount, hold_seq=entries[0].seq, created_at=now
                )
                return [
                    self._markers.put_op(
                        {**record.to_item(), "marker": _run_marker(run_id)},
                        condition="attribute_not_exists(marker)",
                    )
                ]

            try:
                entries = self._commit(
                    tenant_id,
                    [_Change(LedgerKind.USAGE_HOLD, 0, amount, run_id)],
                    require_available=amount if enforce else None,
                    extra=marker,
                )
            except _MarkerConditionFailed:
                existing = self.get_hold(run_id)
            else:
                return RunHold(
                    run_id=run_id, tenant_id=tenant_id, amount=amount, hold_seq=entries[0].seq, created_at=now
                )
        if existing is not None and (existing.tenant_id, existing.amount) == (tenant_id, amount):
            return existing
        raise Conflict(f"run {run_id} already has another hold", code="hold_exists")

    def get_hold(self, run_id: str) -> RunHold | None:
        item = self._markers.get({"marker": _run_marker(run_id)})
        return RunHold.from_item(item) if item else None

    def settle(self, run_id: str, actual: int) -> Settlement:
        """Close the run's hold: release it and charge ``actual`` (at most the hold), in one transaction.

        Idempotent per run: once settled, any further settle (a redelivered message, a late release)
        changes nothing and returns ``applied=False`` with what was charged the first time.
        """
        if actual < 0:
            raise InvalidInput("a charge is never negative")
        hold = self.get_hold(run_id)
        if hold is None:
            raise NotFound(f"run {run_id} has no hold to settle", code="hold_missing")
        if hold.state is HoldState.SETTLED:
            return Settlement(hold=hold, applied=False)
        if actual > hold.amount:
            raise InvalidInput(
                f"run {run_id}: charge {actual} exceeds its hold {hold.amount}", code="charge_exceeds_hold"
            )
        changes = [_Change(LedgerKind.USAGE_RELEASE, 0, -hold.amount, run_id)]
        if actual > 0:
            changes.append(_Change(LedgerKind.USAGE_CHARGE, -actual, 0, run_id))
        now = self._clock()

        def close(entries: list[LedgerEntry]) -> list[dict[str, Any]]:
            return [
                self._markers.update_op(
                    {"marker": _run_marker(run_id)},
                    update="SET #state = :settled, charged = :charged, settle_seq = :seq, settled_at = :now",
                    condition="#state = :held",
                    names={"#state": "state"},
                    values={
                        ":settled": HoldState.SETTLED.value,
                        ":held": HoldState.HELD.value,
                        ":charged": actual,
                        ":seq": entries[-1].seq,
                        ":now": now,
                    },
                )
            ]

        try:
            entries = self._commit(hold.tenant_id, changes, extra=close)
        except (_MarkerConditionFailed, LedgerError) as exc:
            # A concurrent settle of the same run won: its marker condition stopped this transaction,
            # or its release already emptied ``held`` before this attempt could be built.
            settled = self.get_hold(run_id)
            if settled is not None and settled.state is HoldState.SETTLED:
                return Settlement(hold=settled, applied=False)
            if isinstance(exc, LedgerError):
                raise
            raise Conflict(f"run {run_id}: hold changed while settling; retry") from None
        settled_hold = hold.model_copy(
            update={
                "state": HoldState.SETTLED,
                "charged": actual,
                "settle_seq": entries[-1].seq,
                "settled_at": now,
            }
        )
        return Settlement(hold=settled_hold, applied=True, entries=entries)

    def release(self, run_id: str) -> Settlement:
        """Close the run's hold charging nothing (the run never consumed anything)."""
        return self.settle(run_id, 0)

    # --- credit codes ----------------------------------------------------------------------------

    def create_credit_code(self, code: CreditCode) -> CreditCode:
        if code.uses != 0 or code.revoked:
            raise InvalidInput("a new credit code is unused and not revoked")
        self._codes.put_new(code.to_item(), what="credit code")
        return code

    def get_credit_code(self, code_hash: str) -> CreditCode | None:
        item = self._codes.get({"code_hash": code_hash})
        return CreditCode.from_item(item) if item else None

    def revoke_credit_code(self, code_hash: str) -> CreditCode:
        try:
            item = self._codes.update(
                {"code_hash": code_hash},
                update="SET revoked = :true",
                condition="attribute_exists(code_hash)",
                values={":true": True},
            )
        except ConditionFailed:
            raise NotFound("no such credit code", code="credit_code_unknown") from None
        return CreditCode.from_item(item)

    def list_credit_codes(self, *, cursor: str | None = None, limit: int = 100) -> Page[CreditCode]:
        """Operator listing (a paginated scan of a small table)."""
        items, next_cursor = self._codes.scan_page(cursor=cursor, limit=limit)
        return Page[CreditCode](items=[CreditCode.from_item(item) for item in items], cursor=next_cursor)

    def redeem_credit_code(self, tenant_id: str, code_hash: str) -> LedgerEntry:
        """Credit the tenant with the code's amount: once per tenant, within its uses and expiry."""
        code = self.get_credit_code(code_hash)
        if code is None:
            raise NotFound("unknown credit code", code="credit_code_unknown")
        _refuse_unusable_code(code, self._clock())
        now = self._clock()

        def spend(entries: list[LedgerEntry]) -> list[dict[str, Any]]:
            return [
                self._codes.update_op(
                    {"code_hash": code_hash},
                    update="SET uses = uses + :one",
                    condition="revoked = :false AND expires_at > :now AND uses < max_uses",
                    values={":one": 1, ":false": False, ":now": now},
                ),
                self._markers.put_op(
                    {
                        "marker": f"redeem#{code_hash}#{tenant_id}",
                        "tenant_id": tenant_id,
                        "seq": entries[0].seq,
                        "created_at": now,
                    },
                    condition="attribute_not_exists(marker)",
                ),
            ]

        try:
            return self._commit(
                tenant_id,
                [_Change(LedgerKind.CREDIT_CODE_REDEEM, code.credit, 0, f"code:{code_hash}")],
                extra=spend,
            )[0]
        except _MarkerConditionFailed as exc:
            if 1 in exc.indexes:
                raise Conflict(
                    "this tenant already redeemed this credit code", code="credit_code_already_redeemed"
                ) from None
            current = self.get_credit_code(code_hash)
            if current is None:
                raise NotFound("unknown credit code", code="credit_code_unknown") from None
            _refuse_unusable_code(current, self._clock())
            raise Conflict("the credit code changed while redeeming; retry") from None

    # --- export ----------------------------------------------------------------------------------

    def day_entries(self, day: date) -> list[LedgerEntry]:
        """Every tenant's entries created on ``day`` (UTC), ordered by tenant and seq."""
        items = self._ledger.query_all(
            index=LEDGER_BY_DAY,
            key_condition="#day = :day",
            names={"#day": "day"},
            values={":day": day.isoformat()},
            scope={"day": day.isoformat()},
        )
        return sorted(
            (_entry_from_item(item) for item in items), key=lambda entry: (entry.tenant_id, entry.seq)
        )

    def export_day(self, day: date) -> StoredObject:
        """Write ``day``'s entries as CSV to ``exports/ledger/YYYY-MM-DD.csv`` (replaces an earlier one)."""
        with tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024, mode="w+b") as spool:
            text = io.TextIOWrapper(spool, encoding="utf-8", newline="")
            writer = csv.writer(text)
            writer.writerow(EXPORT_COLUMNS)
            for entry in self.day_entries(day):
                row = entry.model_dump(mode="json")
                writer.writerow(
                    [
                        _csv_cell(row[column]) if isinstance(row[column], str) else row[column]
                        for column in EXPORT_COLUMNS
                    ]
                )
            text.flush()
            text.detach()
            spool.seek(0)
            return self._blobs.put_stream(ledger_export_key(day), spool, content_type="text/csv")

    # --- the transaction -------------------------------------------------------------------------

    def _with_idempotency(self, tenant_id: str, idempotency_key: str | None, change: _Change) -> LedgerEntry:
        if idempotency_key is None:
            return self._commit(tenant_id, [change])[0]
        if not _IDEMPOTENCY_KEY.fullmatch(idempotency_key):
            raise InvalidInput("an idempotency key is 1 to 128 letters, digits and _ . : -")
        marker_key = f"op#{tenant_id}#{idempotency_key}"

        def marker(entries: list[LedgerEntry]) -> list[dict[str, Any]]:
            return [
                self._markers.put_op(
                    {
                        "marker": marker_key,
                        "tenant_id": tenant_id,
                        "seq": entries[0].seq,
                        "created_at": entries[0].created_at,
                    },
                    condition="attribute_not_exists(marker)",
                )
            ]

        try:
            return self._commit(tenant_id, [change], extra=marker)[0]
        except _MarkerConditionFailed:
            first = self._markers.get({"marker": marker_key})
            entry = self._ledger.get({"tenant_id": tenant_id, "seq": first["seq"]}) if first else None
            if entry is None:
                raise Conflict("idempotency key in use; retry") from None
            previous = _entry_from_item(entry)
            if (previous.kind, previous.amount, previous.ref) != (change.kind, change.amount, change.ref):
                raise Conflict("this idempotency key was used for a different operation") from None
            return previous

    def _commit(
        self,
        tenant_id: str,
        changes: list[_Change],
        *,
        require_available: int | None = None,
        extra: Callable[[list[LedgerEntry]], list[dict[str, Any]]] = lambda entries: [],
    ) -> list[LedgerEntry]:
        for change in changes:
            if not _REF.fullmatch(change.ref):
                raise InvalidInput("a ledger ref is at most 200 letters, digits, spaces and _ . : # @ / -")
            problem = effect_problem(change.kind, change.amount, change.held_delta)
            if problem is not None:
                raise InvalidInput(problem)
        if require_available is not None and require_available < 0:
            raise InvalidInput("require_available is never negative")
        for attempt in range(_MAX_ATTEMPTS):
            account = self.account(tenant_id)
            if require_available is not None and account.available < require_available:
                raise InsufficientCredit(
                    f"{require_available} micro-USD needed, {max(account.available, 0)} available",
                    details={"required": require_available, "available": account.available},
                )
            now = self._clock()
            entries: list[LedgerEntry] = []
            head = account
            for change in changes:
                entry = next_entry(
                    head,
                    kind=change.kind,
                    amount=change.amount,
                    held_delta=change.held_delta,
                    ref=change.ref,
                    created_at=now,
                )
                entries.append(entry)
                head = account_after(head, entry)
            operations = [
                self._ledger.put_op(
                    {**entry.model_dump(mode="json"), "day": _day(entry.created_at)},
                    condition="attribute_not_exists(seq)",
                )
                for entry in entries
            ]
            operations.append(self._account_update(account, head, require_available))
            first_extra = len(operations)
            operations += extra(entries)
            try:
                transact(self._clients, operations, what="ledger append")
            except TransactionCancelled as exc:
                failed = {
                    index - first_extra
                    for index in range(first_extra, len(operations))
                    if exc.condition_failed(index)
                }
                if failed:
                    raise _MarkerConditionFailed(failed) from None
                # Another writer moved the chain head (or the transaction collided): re-read and retry.
                time.sleep(random.uniform(0, min(0.1, 0.004 * 2**attempt)))  # noqa: S311 - jitter, not secrecy
                continue
            return entries
        raise ServiceUnavailable(f"ledger of {tenant_id} is busy; retry", code="ledger_busy")

    def _account_update(
        self, before: Account, after: Account, require_available: int | None
    ) -> dict[str, Any]:
        values: dict[str, Any] = {
            ":balance": after.balance,
            ":held": after.held,
            ":available": after.available,
            ":seq": after.last_seq,
            ":hash": after.last_hash,
            ":now": after.updated_at,
        }
        if before.last_seq == 0:
            condition = "attribute_not_exists(tenant_id)"
        else:
            condition = "last_seq = :prev"
            values[":prev"] = before.last_seq
            if require_available is not None:
                condition += " AND available >= :need"
                values[":need"] = require_available
        return self._accounts.update_op(
            {"tenant_id": before.tenant_id},
            update=(
                "SET balance = :balance, held = :held, available = :available, last_seq = :seq,"
                " last_hash = :hash, updated_at = :now"
            ),
            condition=condition,
            values=values,
        )


def _run_marker(run_id: str) -> str:
    return f"run#{run_id}"


def _account_from_item(item: dict[str, Any]) -> Account:
    return stored_account({key: value for key, value in item.items() if key in Account.model_fields})


def _entry_from_item(item: dict[str, Any]) -> LedgerEntry:
    return stored_entry({key: value for key, value in item.items() if key in LedgerEntry.model_fields})


def _refuse_unusable_code(code: CreditCode, now: int) -> None:
    if code.revoked:
        raise Gone("this credit code was revoked", code="credit_code_revoked")
    if code.expires_at <= now:
        raise Gone("this credit code has expired", code="credit_code_expired")
    if code.uses >= code.max_uses:
        raise Forbidden("this credit code has no uses left", code="credit_code_exhausted")
