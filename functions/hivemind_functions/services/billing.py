"""Billing reads for tenants and finance: account views, recent entries, CSV, whole-ledger verification.

Every write goes through :class:`hivemind.store.billing.BillingRepository` (one ledger transaction per
balance change); this module only reads and shapes.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import Field

from hivemind.errors import HivemindError
from hivemind.ledger import Account, LedgerEntry, stored_entry
from hivemind.models import StrictModel
from hivemind.store import Store
from hivemind.store.base import Table
from hivemind.store.billing import EXPORT_COLUMNS
from hivemind.store.schema import TableRole

# Cells a spreadsheet would execute (CSV formula injection) get a leading quote, as in the daily export.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


class AccountView(StrictModel):
    """A tenant's account in micro-USD: ``available = balance - held`` is what new runs may hold."""

    tenant_id: str
    balance: int
    held: int
    available: int
    last_seq: int
    last_hash: str
    updated_at: int

    @classmethod
    def of(cls, account: Account) -> AccountView:
        return cls(
            tenant_id=account.tenant_id,
            balance=account.balance,
            held=account.held,
            available=account.available,
            last_seq=account.last_seq,
            last_hash=account.last_hash,
            updated_at=account.updated_at,
        )


class TenantVerification(StrictModel):
    tenant_id: str
    ok: bool
    entries: int = Field(description="entries verified (0 when the chain failed)")
    error: str | None = None
    message: str | None = None
    seq: int | None = Field(default=None, description="the first entry that failed, when known")


class VerificationReport(StrictModel):
    """The result of recomputing chains and balances, one line per tenant account."""

    ok: bool
    tenants_checked: int
    tenants_failed: int
    entries_checked: int
    tenants: list[TenantVerification]
    cursor: str | None = Field(description="pass back to verify the next accounts; null: all done")


def recent_entries(store: Store, tenant_id: str, *, limit: int) -> list[LedgerEntry]:
    """The tenant's last ``limit`` entries, newest first (one query, however long the chain is)."""
    ledger = Table(store.clients, TableRole.LEDGER)
    items, _ = ledger.query(
        key_condition="tenant_id = :tenant",
        values={":tenant": tenant_id},
        scope={"tenant_id": tenant_id},
        limit=limit,
        newest_first=True,
    )
    # A stored row that breaks the entry model is tampering: ledger_invalid (409), never a 500.
    return [
        stored_entry({key: value for key, value in item.items() if key in LedgerEntry.model_fields})
        for item in items
    ]


def verify_accounts(store: Store, *, cursor: str | None, limit: int) -> VerificationReport:
    """Verify up to ``limit`` accounts' chains (hashes, links, seqs, totals, account head), reporting
    each failure by tenant instead of stopping at the first."""
    page = store.billing.list_accounts(cursor=cursor, limit=limit)
    lines: list[TenantVerification] = []
    for account in page.items:
        try:
            count = store.billing.verify(account.tenant_id)
        except HivemindError as exc:
            seq = exc.details.get("seq")
            lines.append(
                TenantVerification(
                    tenant_id=account.tenant_id,
                    ok=False,
                    entries=0,
                    error=exc.code,
                    message=exc.message,
                    seq=seq if isinstance(seq, int) else None,
                )
            )
        else:
            lines.append(TenantVerification(tenant_id=account.tenant_id, ok=True, entries=count))
    failed = sum(1 for line in lines if not line.ok)
    return VerificationReport(
        ok=failed == 0,
        tenants_checked=len(lines),
        tenants_failed=failed,
        entries_checked=sum(line.entries for line in lines),
        tenants=lines,
        cursor=page.cursor,
    )


def _cell(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in _FORMULA_START:
        return "'" + value
    return value


def entries_csv(entries: Iterable[LedgerEntry]) -> str:
    """Entries as CSV with the daily export's columns."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(EXPORT_COLUMNS)
    for entry in entries:
        row = entry.model_dump(mode="json")
        writer.writerow([_cell(row[column]) for column in EXPORT_COLUMNS])
    return buffer.getvalue()


LedgerFormat = Literal["json", "csv"]
