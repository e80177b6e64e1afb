"""The admission chain: order, mutation, fail-closed errors, operator-appended policies, error mapping."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import pytest

from hivemind.admission import (
    ALLOW,
    EXTRA_POLICIES_ENV,
    AdmissionChain,
    AdmissionResult,
    Allow,
    DailyRunQuota,
    Decision,
    Deny,
    DenyAll,
    DenyCode,
    InMemoryRunCounter,
    MaxPromptBytes,
    Mutate,
    build_chain,
    parse_specs,
    raise_for_decision,
    standard_registry,
)
from hivemind.errors import (
    BudgetExceeded,
    HivemindError,
    InsufficientCredit,
    PolicyDenied,
    RateLimited,
    Unauthenticated,
)


@dataclass(frozen=True)
class RunRequest:
    caller_id: str
    prompt_bytes: int
    timeout_s: int = 600


class Recording:
    """A policy that records the contexts it saw and returns a fixed decision."""

    def __init__(self, name: str, decision: Decision[Any] = ALLOW):
        self.name = name
        self.decision = decision
        self.seen: list[Any] = []

    def evaluate(self, ctx: Any) -> Decision[Any]:
        self.seen.append(ctx)
        return self.decision


class ClampTimeout:
    name = "clamp_timeout"

    def evaluate(self, ctx: RunRequest) -> Decision[RunRequest]:
        if ctx.timeout_s <= 120:
            return ALLOW
        return Mutate(replace(ctx, timeout_s=120), "timeout_s clamped to 120")


class Exploding:
    name = "exploding"

    def evaluate(self, ctx: Any) -> Decision[Any]:
        raise RuntimeError("sk-live-secret leaked in a message")


REQUEST = RunRequest(caller_id="tenant_a", prompt_bytes=100)


def test_policies_run_in_order_and_all_allow() -> None:
    first, second = Recording("first"), Recording("second")
    result = AdmissionChain([first, second]).evaluate(REQUEST)
    assert result.allowed
    assert result.deny_code is None and result.reason is None
    assert [entry.policy for entry in result.trail] == ["first", "second"]
    assert first.seen == [REQUEST] and second.seen == [REQUEST]
    raise_for_decision(result)


def test_mutation_is_visible_to_later_policies_and_in_the_result() -> None:
    later = Recording("later")
    result = AdmissionChain([ClampTimeout(), later]).evaluate(REQUEST)
    assert later.seen == [replace(REQUEST, timeout_s=120)]
    assert result.context.timeout_s == 120
    assert result.trail[0].outcome == "mutate"
    assert result.trail[0].note == "timeout_s clamped to 120"


def test_first_deny_stops_evaluation() -> None:
    later = Recording("later")
    denying = Recording("room_active", Deny(DenyCode.ROOM_INACTIVE, "room was deleted"))
    result = AdmissionChain([ClampTimeout(), denying, later]).evaluate(REQUEST)
    assert not result.allowed
    assert later.seen == []
    assert result.deny_code == "room_inactive"
    assert result.reason == "room was deleted"
    assert [(e.policy, e.outcome) for e in result.trail] == [
        ("clamp_timeout", "mutate"),
        ("room_active", "deny"),
    ]
    # The context handed back is the one the denying policy saw.
    assert result.context.timeout_s == 120


def test_exception_is_a_policy_error_deny_that_hides_the_exception_text(
    caplog: pytest.LogCaptureFixture,
) -> None:
    later = Recording("later")
    with caplog.at_level(logging.ERROR, logger="hivemind.admission"):
        result = AdmissionChain([Exploding(), later]).evaluate(REQUEST)
    assert not result.allowed
    assert result.deny_code == "policy_error"
    assert result.reason == "exploding failed"
    assert later.seen == []
    assert "sk-live-secret" not in repr(result)
    assert "sk-live-secret" not in caplog.text
    assert "exploding raised RuntimeError" in caplog.text


@pytest.mark.parametrize(
    "bad_decision",
    [None, True, "allow", {"allowed": True}, Mutate("not a RunRequest", "swapped")],
)
def test_a_non_decision_or_a_context_of_another_type_is_a_policy_error(bad_decision: Any) -> None:
    result = AdmissionChain([Recording("sloppy", bad_decision)]).evaluate(REQUEST)
    assert not result.allowed
    assert result.deny_code == "policy_error"


def test_chain_refuses_empty_and_nameless_policies() -> None:
    with pytest.raises(ValueError, match="at least one policy"):
        AdmissionChain([])

    class Nameless:
        def evaluate(self, ctx: Any) -> Decision[Any]:
            return ALLOW

    with pytest.raises(ValueError, match="needs a name"):
        AdmissionChain([Nameless()])  # type: ignore[list-item]


@pytest.mark.parametrize("code", ["", "Has Caps", "x" * 65, "1abc", "semi;colon"])
def test_deny_codes_are_stable_identifiers(code: str) -> None:
    with pytest.raises(ValueError):
        Deny(code, "reason")


def test_deny_needs_a_reason_and_normalizes_enum_codes() -> None:
    with pytest.raises(ValueError, match="reason"):
        Deny("room_inactive", "")
    deny = Deny(DenyCode.ROOM_INACTIVE, "gone")
    assert type(deny.code) is str


def test_result_cannot_be_allowed_with_a_denial() -> None:
    with pytest.raises(ValueError):
        AdmissionResult(allowed=True, context=REQUEST, trail=(), denial=Deny("room_inactive", "x"))
    with pytest.raises(ValueError):
        AdmissionResult(allowed=False, context=REQUEST, trail=())


# --- building from configuration -----------------------------------------------------------------


def test_build_chain_appends_operator_policies_after_the_head() -> None:
    counter = InMemoryRunCounter()
    chain = build_chain(
        [ClampTimeout()], "max_prompt_bytes:1000, daily_run_quota:2", standard_registry(counter)
    )
    assert chain.names == ("clamp_timeout", "max_prompt_bytes", "daily_run_quota")
    assert chain.evaluate(REQUEST).allowed
    assert chain.evaluate(REQUEST).allowed
    third = chain.evaluate(REQUEST)
    assert third.deny_code == "quota_exceeded"
    # Another caller has its own quota; a large prompt is refused before the quota is touched.
    assert chain.evaluate(replace(REQUEST, caller_id="tenant_b")).allowed
    too_big = chain.evaluate(replace(REQUEST, caller_id="tenant_c", prompt_bytes=1001))
    assert too_big.deny_code == "prompt_too_large"
    # The refused request did not spend tenant_c's quota.
    assert chain.evaluate(replace(REQUEST, caller_id="tenant_c")).allowed
    assert chain.evaluate(replace(REQUEST, caller_id="tenant_c")).allowed
    assert chain.evaluate(replace(REQUEST, caller_id="tenant_c")).deny_code == "quota_exceeded"


def test_build_chain_accepts_a_list_and_no_extras() -> None:
    registry = standard_registry(InMemoryRunCounter())
    assert build_chain([ClampTimeout()], ["max_prompt_bytes:5"], registry).names == (
        "clamp_timeout",
        "max_prompt_bytes",
    )
    assert build_chain([ClampTimeout()], None, registry).names == ("clamp_timeout",)
    assert build_chain([ClampTimeout()], " , ", registry).names == ("clamp_timeout",)


def _factory_raising(arg: str | None) -> Any:
    raise RuntimeError("backend down")


@pytest.mark.parametrize(
    ("head", "specs", "registry"),
    [
        ([ClampTimeout()], "no_such_policy", {}),
        ([ClampTimeout()], "max_prompt_bytes", None),
        ([ClampTimeout()], "max_prompt_bytes:lots", None),
        ([ClampTimeout()], "max_prompt_bytes:0", None),
        ([ClampTimeout()], "daily_run_quota:-3", None),
        ([ClampTimeout()], "Bad Name:1", None),
        ([ClampTimeout()], "broken", {"broken": _factory_raising}),
        ([ClampTimeout()], "not_policy", {"not_policy": lambda arg: object()}),
        ([], None, {}),
        ([object()], None, {}),
    ],
)
def test_unbuildable_chain_is_a_deny_all_reporting_chain_unavailable(
    head: list[Any], specs: str | None, registry: dict[str, Any] | None, caplog: pytest.LogCaptureFixture
) -> None:
    registry = standard_registry(InMemoryRunCounter()) if registry is None else registry
    with caplog.at_level(logging.ERROR, logger="hivemind.admission"):
        chain = build_chain(head, specs, registry)
    assert chain.names == ("deny_all",)
    assert "admission chain unavailable" in caplog.text
    result = chain.evaluate(REQUEST)
    assert not result.allowed
    assert result.deny_code == "policy_chain_unavailable"
    with pytest.raises(PolicyDenied) as info:
        raise_for_decision(result)
    assert info.value.code == "policy_chain_unavailable"


def test_parse_specs_splits_name_and_argument_on_the_first_colon() -> None:
    assert parse_specs("a, b:1 ,c:x:y") == [("a", None), ("b", "1"), ("c", "x:y")]
    assert EXTRA_POLICIES_ENV == "HIVEMIND_ADMISSION_EXTRA_POLICIES"


# --- reusable policies ---------------------------------------------------------------------------


def test_max_prompt_bytes_allows_at_the_limit_and_denies_above() -> None:
    policy = MaxPromptBytes(100)
    assert isinstance(policy.evaluate(RunRequest("t", 100)), Allow)
    denied = policy.evaluate(RunRequest("t", 101))
    assert isinstance(denied, Deny) and denied.code == "prompt_too_large"
    with pytest.raises(ValueError):
        MaxPromptBytes(0)


def test_daily_quota_resets_on_the_next_utc_day() -> None:
    now = [1_700_000_000.0]  # 2023-11-14T22:13:20Z
    quota = DailyRunQuota(InMemoryRunCounter(), 1, clock=lambda: now[0])
    assert isinstance(quota.evaluate(REQUEST), Allow)
    assert isinstance(quota.evaluate(REQUEST), Deny)
    now[0] += 2 * 3600  # past midnight UTC
    assert isinstance(quota.evaluate(REQUEST), Allow)


def test_policy_missing_context_fields_fails_closed() -> None:
    @dataclass(frozen=True)
    class Bare:
        room_id: str

    chain = AdmissionChain([MaxPromptBytes(10)])
    assert chain.evaluate(Bare("room_x")).deny_code == "policy_error"


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "error_type", "status"),
    [
        ("credential_invalid", Unauthenticated, 401),
        ("credential_expired", Unauthenticated, 401),
        ("credential_revoked", Unauthenticated, 401),
        ("insufficient_credit", InsufficientCredit, 402),
        ("rate_limited", RateLimited, 429),
        ("quota_exceeded", RateLimited, 429),
        ("budget_exceeded", BudgetExceeded, 403),
        ("room_inactive", PolicyDenied, 403),
        ("policy_error", PolicyDenied, 403),
        ("operator_custom_rule", PolicyDenied, 403),
    ],
)
def test_raise_for_decision_maps_deny_codes_to_errors(
    code: str, error_type: type[HivemindError], status: int
) -> None:
    result = AdmissionChain([Recording("p", Deny(code, "because"))]).evaluate(REQUEST)
    with pytest.raises(error_type) as info:
        raise_for_decision(result)
    assert type(info.value) is error_type
    assert info.value.code == code
    assert info.value.status == status
    assert info.value.to_dict() == {"error": code, "message": "because"}


def test_deny_all_denies_with_its_code() -> None:
    result = AdmissionChain([DenyAll("maintenance", "read-only maintenance window")]).evaluate(REQUEST)
    assert (result.deny_code, result.reason) == ("maintenance", "read-only maintenance window")
