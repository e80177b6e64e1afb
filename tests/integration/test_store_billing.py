"""Billing on a real moto server: atomic holds under concurrency, settlement, credit codes, prices, export."""

from __future__ import annotations

import csv
import io
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pytest

from hivemind.errors import (
    Conflict,
    Forbidden,
    Gone,
    HivemindError,
    InsufficientCredit,
    InvalidInput,
    LedgerError,
    NotFound,
    ServiceUnavailable,
)
from hivemind.ledger import LedgerKind, verify_chain
from hivemind.store import AwsClients, Store
from hivemind.store.billing import CreditCode, HoldState
from hivemind.store.prices import LlmUsage
from hivemind.store.schema import TableRole, ledger_export_key

from .conftest import T0, FakeClock

pytestmark = pytest.mark.moto_server

HOLD = 1_000


@pytest.mark.slow
def test_fifty_concurrent_holds_never_overdraw(clocked_store: Store) -> None:
    """Credit for exactly 10 holds, 50 racing threads: 10 succeed, 40 are refused, the chain is whole."""
    billing = clocked_store.billing
    billing.grant("tenant_payer", 10 * HOLD)
    observed_available: list[int] = []
    start = threading.Barrier(50)

    def take(index: int) -> str:
        start.wait()
        try:
            billing.hold("tenant_payer", f"run_{index}", HOLD, enforce=True)
        except InsufficientCredit:
            return "refused"
        finally:
            observed_available.append(billing.account("tenant_payer").available)
        return "held"

    with ThreadPoolExecutor(max_workers=50) as pool:
        outcomes = list(pool.map(take, range(50)))

    assert outcomes.count("held") == 10
    assert outcomes.count("refused") == 40
    assert min(observed_available) >= 0
    account = billing.account("tenant_payer")
    assert (account.balance, account.held, account.available, account.last_seq) == (
        10 * HOLD,
        10 * HOLD,
        0,
        11,
    )
    entries = list(billing.entries("tenant_payer"))
    assert [entry.seq for entry in entries] == list(range(1, 12))
    assert verify_chain(entries, account) == 11
    assert billing.verify("tenant_payer") == 11
    held_runs = {entry.ref for entry in entries if entry.kind is LedgerKind.USAGE_HOLD}
    assert len(held_runs) == 10
    assert all(billing.get_hold(run_id).amount == HOLD for run_id in held_runs)


def test_hold_is_idempotent_per_run(clocked_store: Store) -> None:
    billing = clocked_store.billing
    billing.grant("tenant_a", 5 * HOLD)
    first = billing.hold("tenant_a", "run_1", HOLD, enforce=True)
    assert billing.hold("tenant_a", "run_1", HOLD, enforce=True) == first
    with pytest.raises(Conflict) as caught:
        billing.hold("tenant_a", "run_1", 2 * HOLD, enforce=True)
    assert caught.value.code == "hold_exists"
    with pytest.raises(Conflict):
        billing.hold("tenant_b", "run_1", HOLD, enforce=False)
    assert billing.account("tenant_a").held == HOLD
    assert billing.account("tenant_a").last_seq == 2


def test_insufficient_credit_only_when_enforced(clocked_store: Store) -> None:
    billing = clocked_store.billing
    with pytest.raises(InsufficientCredit) as caught:
        billing.hold("tenant_new", "run_1", HOLD, enforce=True)
    assert caught.value.details == {"required": HOLD, "available": 0}
    assert billing.account("tenant_new").last_seq == 0  # nothing was written
    hold = billing.hold("tenant_new", "run_2", HOLD, enforce=False)
    assert hold.state is HoldState.HELD
    assert billing.account("tenant_new").available == -HOLD


def test_settle_releases_and_charges_once(clocked_store: Store, clock: FakeClock) -> None:
    billing = clocked_store.billing
    billing.grant("tenant_a", 10 * HOLD)
    billing.hold("tenant_a", "run_1", HOLD, enforce=True)
    clock.advance(30)

    first = billing.settle("run_1", 250)
    assert first.applied
    assert [entry.kind for entry in first.entries] == [LedgerKind.USAGE_RELEASE, LedgerKind.USAGE_CHARGE]
    assert (first.hold.state, first.hold.charged, first.hold.settled_at) == (
        HoldState.SETTLED,
        250,
        clock.now,
    )
    after_first = billing.account("tenant_a")
    assert (after_first.balance, after_first.held) == (10 * HOLD - 250, 0)

    second = billing.settle("run_1", 999)  # a redelivered settlement, even with another amount
    assert not second.applied and second.entries == []
    assert second.hold.charged == 250
    assert billing.release("run_1").applied is False
    assert billing.account("tenant_a") == after_first
    assert billing.verify("tenant_a") == 4


def test_release_charges_nothing(clocked_store: Store) -> None:
    billing = clocked_store.billing
    billing.grant("tenant_a", HOLD)
    billing.hold("tenant_a", "run_1", HOLD, enforce=True)
    released = billing.release("run_1")
    assert [entry.kind for entry in released.entries] == [LedgerKind.USAGE_RELEASE]
    account = billing.account("tenant_a")
    assert (account.balance, account.held, account.available) == (HOLD, 0, HOLD)


def test_charge_above_the_hold_is_refused_and_writes_nothing(clocked_store: Store) -> None:
    billing = clocked_store.billing
    billing.grant("tenant_a", 10 * HOLD)
    billing.hold("tenant_a", "run_1", HOLD, enforce=True)
    before = billing.account("tenant_a")
    with pytest.raises(InvalidInput) as caught:
        billing.settle("run_1", HOLD + 1)
    assert caught.value.code == "charge_exceeds_hold"
    assert billing.account("tenant_a") == before
    assert billing.get_hold("run_1").state is HoldState.HELD
    assert billing.settle("run_1", HOLD).applied  # exactly the hold is fine
    with pytest.raises(NotFound) as missing:
        billing.settle("run_unknown", 0)
    assert missing.value.code == "hold_missing"


def test_concurrent_settlements_apply_once(clocked_store: Store) -> None:
    billing = clocked_store.billing
    billing.grant("tenant_a", 10 * HOLD)
    billing.hold("tenant_a", "run_1", HOLD, enforce=True)
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: billing.settle("run_1", 400), range(8)))
    assert sum(result.applied for result in results) == 1
    assert billing.account("tenant_a").balance == 10 * HOLD - 400
    assert billing.verify("tenant_a") == 4


def test_grant_with_an_idempotency_key_applies_once(clocked_store: Store) -> None:
    billing = clocked_store.billing
    first = billing.grant("tenant_a", 700, idempotency_key="signup")
    assert billing.grant("tenant_a", 700, idempotency_key="signup") == first
    with pytest.raises(Conflict, match="different operation"):
        billing.grant("tenant_a", 900, idempotency_key="signup")
    assert billing.account("tenant_a").balance == 700
    with pytest.raises(InvalidInput):
        billing.grant("tenant_a", 0)
    with pytest.raises(InvalidInput):
        billing.grant("tenant_a", 5, ref="=HYPERLINK(evil)")


def test_missing_price_is_an_error_never_free(clocked_store: Store) -> None:
    prices = clocked_store.prices
    with pytest.raises(ServiceUnavailable) as caught:
        prices.hold_for(providers=["openai"], token_budget=1000, timeout_s=60)
    assert caught.value.code == "price_missing"

    prices.set_price(
        "openai", "gpt-small", prompt_per_million=150_000, completion_per_million=600_000, updated_by="op"
    )
    with pytest.raises(ServiceUnavailable, match="runner time"):
        prices.hold_for(providers=["openai"], token_budget=1000, timeout_s=60)
    prices.set_runner_fee(10, updated_by="op")
    # 1000 tokens at the highest per-million price (600_000), rounded up, plus 60 s x 10.
    assert prices.hold_for(providers=["openai"], token_budget=1000, timeout_s=60) == 600 + 600
    assert prices.hold_for(providers=[], token_budget=0, timeout_s=60) == 600
    with pytest.raises(ServiceUnavailable):
        prices.hold_for(providers=[], token_budget=10, timeout_s=60)
    with pytest.raises(ServiceUnavailable):
        prices.hold_for(providers=["openai", "unpriced"], token_budget=10, timeout_s=60)

    usage = [LlmUsage(provider="openai", model="gpt-small", prompt_tokens=1, completion_tokens=1)]
    assert prices.cost_of(usage, runner_seconds=3) == 1 + 30  # 0.75 micro-USD rounds up to 1
    with pytest.raises(ServiceUnavailable) as caught:
        prices.cost_of(
            [LlmUsage(provider="openai", model="gpt-huge", prompt_tokens=1, completion_tokens=0)],
            runner_seconds=0,
        )
    assert caught.value.code == "price_missing"
    assert [price.model for price in prices.list_prices()] == ["gpt-small"]
    assert prices.remove_price("openai", "gpt-small")
    with pytest.raises(ServiceUnavailable):
        prices.get_price("openai", "gpt-small")


def new_code(store: Store, code_hash: str, **fields: object) -> CreditCode:
    values = {
        "credit": 5_000,
        "max_uses": 2,
        "expires_at": T0 + 3600,
        "created_by": "admin",
        "created_at": T0,
    }
    return store.billing.create_credit_code(CreditCode(code_hash=code_hash, **{**values, **fields}))


def test_credit_code_redeems_once_per_tenant_and_within_max_uses(clocked_store: Store) -> None:
    billing = clocked_store.billing
    new_code(clocked_store, "c" * 64)
    entry = billing.redeem_credit_code("tenant_a", "c" * 64)
    assert (entry.kind, entry.amount, entry.ref) == (LedgerKind.CREDIT_CODE_REDEEM, 5_000, "code:" + "c" * 64)
    with pytest.raises(Conflict) as caught:
        billing.redeem_credit_code("tenant_a", "c" * 64)
    assert caught.value.code == "credit_code_already_redeemed"
    billing.redeem_credit_code("tenant_b", "c" * 64)
    with pytest.raises(Forbidden) as caught:
        billing.redeem_credit_code("tenant_c", "c" * 64)
    assert caught.value.code == "credit_code_exhausted"
    assert billing.get_credit_code("c" * 64).uses == 2
    assert billing.account("tenant_a").balance == 5_000
    assert billing.account("tenant_c").last_seq == 0


def test_concurrent_redemptions_respect_max_uses(clocked_store: Store) -> None:
    new_code(clocked_store, "d" * 64, max_uses=3)

    def redeem(index: int) -> str:
        try:
            clocked_store.billing.redeem_credit_code(f"tenant_{index}", "d" * 64)
        except HivemindError as exc:
            return exc.code
        return "ok"

    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(redeem, range(8)))
    assert outcomes.count("ok") == 3
    assert clocked_store.billing.get_credit_code("d" * 64).uses == 3


def test_credit_code_expiry_revocation_and_unknown(clocked_store: Store, clock: FakeClock) -> None:
    billing = clocked_store.billing
    new_code(clocked_store, "e" * 64, expires_at=T0 + 10)
    new_code(clocked_store, "f" * 64)
    clock.advance(10)
    with pytest.raises(Gone) as caught:
        billing.redeem_credit_code("tenant_a", "e" * 64)
    assert caught.value.code == "credit_code_expired"
    billing.revoke_credit_code("f" * 64)
    with pytest.raises(Gone) as caught:
        billing.redeem_credit_code("tenant_a", "f" * 64)
    assert caught.value.code == "credit_code_revoked"
    with pytest.raises(NotFound) as caught:
        billing.redeem_credit_code("tenant_a", "0" * 64)
    assert caught.value.code == "credit_code_unknown"
    with pytest.raises(Conflict):
        new_code(clocked_store, "f" * 64, credit=1)
    assert billing.account("tenant_a").last_seq == 0
    assert {code.code_hash for code in billing.list_credit_codes().items} == {"e" * 64, "f" * 64}


def test_tampering_with_the_stored_ledger_is_detected(clocked_store: Store, aws: AwsClients) -> None:
    billing = clocked_store.billing
    billing.grant("tenant_a", 1_000)
    billing.hold("tenant_a", "run_1", 300, enforce=True)
    billing.settle("run_1", 100)
    assert billing.verify_all() == {"tenant_a": 4}
    aws.dynamodb.update_item(
        TableName=aws.config.table_name(TableRole.LEDGER),
        Key={"tenant_id": {"S": "tenant_a"}, "seq": {"N": "1"}},
        UpdateExpression="SET amount = :forged, balance_after = :forged",
        ExpressionAttributeValues={":forged": {"N": "1000000"}},
    )
    with pytest.raises(LedgerError) as caught:
        billing.verify("tenant_a")
    assert caught.value.details["seq"] == 1


def test_a_stored_entry_that_breaks_the_entry_model_is_ledger_invalid(
    clocked_store: Store, aws: AwsClients
) -> None:
    billing = clocked_store.billing
    billing.grant("tenant_a", 1_000)
    billing.hold("tenant_a", "run_1", 300, enforce=True)
    billing.grant("tenant_b", 500)
    aws.dynamodb.update_item(  # a hold that also credits: no transaction writes that shape
        TableName=aws.config.table_name(TableRole.LEDGER),
        Key={"tenant_id": {"S": "tenant_a"}, "seq": {"N": "2"}},
        UpdateExpression="SET amount = :credit",
        ExpressionAttributeValues={":credit": {"N": "1"}},
    )
    with pytest.raises(LedgerError, match="usage_hold entry only increases the held amount") as caught:
        billing.verify("tenant_a")
    assert caught.value.details == {"tenant_id": "tenant_a", "seq": 2}
    with pytest.raises(LedgerError):
        billing.verify_all()
    assert billing.verify("tenant_b") == 1
    # Reading the entries back (the tenant's ledger listing) fails the same way.
    with pytest.raises(LedgerError, match="seq 2"):
        billing.list_ledger("tenant_a")


def test_an_entry_written_past_the_account_head_is_detected(clocked_store: Store, aws: AwsClients) -> None:
    billing = clocked_store.billing
    first = billing.grant("tenant_a", 1_000)
    forged = {**first.model_dump(mode="json"), "seq": 2, "ref": "forged"}
    aws.dynamodb.put_item(
        TableName=aws.config.table_name(TableRole.LEDGER),
        Item={
            key: {"N": str(value)} if isinstance(value, int) else {"S": value}
            for key, value in forged.items()
        },
    )
    with pytest.raises(LedgerError, match="beyond the account head") as caught:
        billing.verify("tenant_a")
    assert caught.value.details["seq"] == 2


def test_ledger_listing_and_daily_csv_export(clocked_store: Store, clock: FakeClock) -> None:
    billing = clocked_store.billing
    billing.grant("tenant_b", 2_000)
    billing.grant("tenant_a", 1_000)
    billing.adjust("tenant_a", -50, note="-50 manual fix")
    clock.advance(86_400)
    billing.grant("tenant_a", 7)  # the next day: not in the export

    page = billing.list_ledger("tenant_a", limit=2)
    assert [entry.seq for entry in page.items] == [1, 2]
    assert [entry.seq for entry in billing.list_ledger("tenant_a", cursor=page.cursor).items] == [3]

    day = datetime.fromtimestamp(T0, tz=UTC).date()
    stored = billing.export_day(day)
    assert stored.key == ledger_export_key(day) == "exports/ledger/2023-11-14.csv"
    rows = list(csv.DictReader(io.StringIO(clocked_store.blobs.get_bytes(stored.key).decode())))
    assert [(row["tenant_id"], row["seq"], row["kind"], row["amount"]) for row in rows] == [
        ("tenant_a", "1", "credit_grant", "1000"),
        ("tenant_a", "2", "adjustment", "-50"),
        ("tenant_b", "1", "credit_grant", "2000"),
    ]
    assert rows[1]["ref"] == "'-50 manual fix"  # cannot run as a spreadsheet formula
    assert rows[0]["hash"] == billing.list_ledger("tenant_a").items[0].hash
