"""The ledger's hash chain and whole-chain verification (hivemind.ledger)."""

from __future__ import annotations

import hashlib
import itertools

import pytest
import rfc8785
from pydantic import ValidationError

from hivemind.errors import LedgerError
from hivemind.ledger import (
    GENESIS_HASH,
    Account,
    LedgerEntry,
    LedgerKind,
    account_after,
    entry_hash,
    next_entry,
    stored_account,
    stored_entry,
    verify_chain,
)

T0 = 1_700_000_000


def build_chain(tenant_id: str = "tenant_a") -> tuple[list[LedgerEntry], Account]:
    """grant 1000, hold 300, release 300, charge 120, adjustment -30."""
    account = Account(tenant_id=tenant_id)
    steps = [
        (LedgerKind.CREDIT_GRANT, 1000, 0, "grant"),
        (LedgerKind.USAGE_HOLD, 0, 300, "run_1"),
        (LedgerKind.USAGE_RELEASE, 0, -300, "run_1"),
        (LedgerKind.USAGE_CHARGE, -120, 0, "run_1"),
        (LedgerKind.ADJUSTMENT, -30, 0, "refund reversal"),
    ]
    entries = []
    for offset, (kind, amount, held_delta, ref) in enumerate(steps):
        entry = next_entry(
            account, kind=kind, amount=amount, held_delta=held_delta, ref=ref, created_at=T0 + offset
        )
        entries.append(entry)
        account = account_after(account, entry)
    return entries, account


def resealed(entry: LedgerEntry, **changes: object) -> LedgerEntry:
    """``entry`` with ``changes`` and a hash recomputed over them (a forger who knows the construction)."""
    fields = {**entry.hashed_fields(), **changes}
    return LedgerEntry.model_validate({**fields, "hash": entry_hash(fields["prev_hash"], fields)})


def test_chain_verifies_and_totals_recompute() -> None:
    entries, account = build_chain()
    assert verify_chain(entries, account) == 5
    assert (account.balance, account.held, account.available) == (850, 0, 850)
    assert entries[0].prev_hash == GENESIS_HASH
    assert [entry.seq for entry in entries] == [1, 2, 3, 4, 5]
    assert all(later.prev_hash == earlier.hash for earlier, later in itertools.pairwise(entries))


def test_entry_hash_is_sha256_of_prev_hash_bytes_and_jcs() -> None:
    entries, _ = build_chain()
    second = entries[1]
    expected = hashlib.sha256(
        bytes.fromhex(second.prev_hash) + rfc8785.dumps(second.hashed_fields())
    ).hexdigest()
    assert second.hash == expected
    assert "hash" not in second.hashed_fields()


def test_tampered_amount_is_refused_naming_its_seq() -> None:
    entries, account = build_chain()
    entries[3] = entries[3].model_copy(update={"amount": -1})
    with pytest.raises(LedgerError, match="seq 4: hash does not match") as caught:
        verify_chain(entries, account)
    assert caught.value.details["seq"] == 4


def test_flipped_byte_in_hash_breaks_the_next_link() -> None:
    entries, account = build_chain()
    flipped = ("0" if entries[1].hash[0] != "0" else "1") + entries[1].hash[1:]
    entries[1] = entries[1].model_copy(update={"hash": flipped})
    with pytest.raises(LedgerError) as caught:
        verify_chain(entries, account)
    assert caught.value.details["seq"] == 2


def test_gap_is_refused() -> None:
    entries, account = build_chain()
    del entries[2]
    with pytest.raises(LedgerError, match="expected seq 3, found seq 4") as caught:
        verify_chain(entries, account)
    assert caught.value.details["seq"] == 4


def test_reordered_entries_are_refused() -> None:
    entries, account = build_chain()
    entries[1], entries[2] = entries[2], entries[1]
    with pytest.raises(LedgerError, match="expected seq 2, found seq 3"):
        verify_chain(entries, account)


def test_wrong_balance_is_refused_even_with_a_recomputed_hash() -> None:
    entries, _ = build_chain()
    forged = resealed(entries[0], balance_after=1_000_000)
    with pytest.raises(LedgerError, match="seq 1: totals do not recompute"):
        verify_chain([forged])


def test_forged_entry_cannot_be_spliced_in_by_rehashing_the_rest() -> None:
    """Re-sealing an edited entry breaks the link to the next, untouched entry."""
    entries, account = build_chain()
    entries[0] = resealed(entries[0], amount=5000, balance_after=5000)
    with pytest.raises(LedgerError, match="seq 2: prev_hash does not link"):
        verify_chain(entries, account)


def test_truncated_tail_is_caught_by_the_account_head() -> None:
    entries, account = build_chain()
    assert verify_chain(entries[:-1]) == 4
    with pytest.raises(LedgerError, match="account head is seq 5 but the chain ends at seq 4"):
        verify_chain(entries[:-1], account)


def test_edited_account_balance_is_caught() -> None:
    entries, account = build_chain()
    with pytest.raises(LedgerError, match="the ledger recomputes to 850 and 0"):
        verify_chain(entries, account.model_copy(update={"balance": 10_000}))


def test_entry_from_another_tenant_is_refused() -> None:
    entries, account = build_chain("tenant_a")
    others, _ = build_chain("tenant_b")
    with pytest.raises(LedgerError, match="belongs to tenant tenant_b"):
        verify_chain([*entries[:2], others[2]], account)


def test_replaying_a_chain_as_another_tenant_fails() -> None:
    """The tenant id is hashed: relabelling an entry without re-sealing it does not verify."""
    entries, _ = build_chain("tenant_a")
    relabelled = [entry.model_copy(update={"tenant_id": "tenant_b"}) for entry in entries]
    with pytest.raises(LedgerError, match="seq 1: hash does not match"):
        verify_chain(relabelled)


def test_impossible_entries_cannot_be_built_or_parsed() -> None:
    account = Account(tenant_id="tenant_a")
    with pytest.raises(LedgerError, match="only decreases the balance"):
        next_entry(account, kind=LedgerKind.USAGE_CHARGE, amount=5, held_delta=0, ref="run_1", created_at=T0)
    with pytest.raises(LedgerError, match="releasing 10 but only 0 is held"):
        next_entry(
            account, kind=LedgerKind.USAGE_RELEASE, amount=0, held_delta=-10, ref="run_1", created_at=T0
        )
    entries, _ = build_chain()
    with pytest.raises(ValidationError, match="credit_grant entry adds a positive amount"):
        LedgerEntry.model_validate({**entries[0].model_dump(), "amount": -1000})


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"amount": 1}, "usage_hold entry only increases the held amount"),  # a hold that also credits
        ({"kind": "usage_gift"}, "kind"),
        ({"held_after": -1}, "held_after"),
        ({"hash": "not-a-hash"}, "hash"),
        ({"extra": True}, "extra"),
    ],
)
def test_stored_entry_that_breaks_the_model_is_ledger_invalid_naming_its_seq(
    change: dict[str, object], problem: str
) -> None:
    entries, _ = build_chain()
    hold = entries[1].model_dump(mode="json")
    assert stored_entry(hold) == entries[1]
    with pytest.raises(LedgerError, match=problem) as refused:
        stored_entry({**hold, **change})
    assert refused.value.code == "ledger_invalid"
    assert refused.value.details == {"tenant_id": "tenant_a", "seq": 2}


def test_stored_entry_without_a_usable_seq_still_fails_as_ledger_invalid() -> None:
    entries, _ = build_chain()
    row = {**entries[0].model_dump(mode="json"), "seq": "1", "tenant_id": 7}
    with pytest.raises(LedgerError, match=r"tenant \? seq \?: the stored entry") as refused:
        stored_entry(row)
    assert refused.value.details == {}


def test_stored_account_that_breaks_the_model_is_ledger_invalid() -> None:
    _, account = build_chain()
    row = account.model_dump(mode="json")
    assert stored_account(row) == account
    with pytest.raises(LedgerError, match="held") as refused:
        stored_account({**row, "held": -5})
    assert (refused.value.code, refused.value.details) == ("ledger_invalid", {"tenant_id": "tenant_a"})


def test_entry_hash_refuses_bad_prev_hash_and_self_coverage() -> None:
    with pytest.raises(LedgerError, match="not hex"):
        entry_hash("zz" * 32, {"seq": 1})
    with pytest.raises(LedgerError, match="not a SHA-256"):
        entry_hash("00" * 16, {"seq": 1})
    with pytest.raises(LedgerError, match="cannot cover its own hash"):
        entry_hash(GENESIS_HASH, {"seq": 1, "hash": GENESIS_HASH})
