"""Scope simulation with real scoped SQL (DESIGN §16.7).

The scope agent may ask the pipeline to run the room's query agent against a *candidate* policy
(``POST /v1/simulate``). The candidate is validated exactly like a final policy (parsed, and narrowed
against the room's ``data_policy`` when the room sets one), then a real scoped database is built for
it, so the simulated query agent meets the same tables, the same gate and the same errors it would
meet in the query stage. Running the agent (sandbox, bridge, budgets) is the pipeline's job: it
passes a callable that receives the database and returns what the agent produced.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from hivemind.policy import ScopePolicy, narrow, parse_policy
from hivemind_runner.scoped.database import ScopedDatabase
from hivemind_runner.scoped.items import RoomItem
from hivemind_runner.scoped.limits import ScopedLimits
from hivemind_runner.scoped.loader import build_scoped_database

T = TypeVar("T")


def resolve_policy(
    candidate: str | bytes | Mapping[str, Any] | ScopePolicy, room_policy: ScopePolicy | None
) -> ScopePolicy:
    """The policy a run may use: ``candidate`` parsed, and provably narrower than the room's
    ``data_policy`` when there is one. Raises :class:`~hivemind.errors.InvalidPolicy`; never widens,
    never falls back."""
    policy = parse_policy(candidate)
    return policy if room_policy is None else narrow(room_policy, policy)


def simulate(
    candidate: str | bytes | Mapping[str, Any] | ScopePolicy,
    run_query_agent: Callable[[ScopedDatabase], T],
    *,
    items: Sequence[RoomItem],
    room_policy: ScopePolicy | None,
    limits: ScopedLimits | None = None,
) -> T:
    """Build the scoped database for ``candidate`` and call ``run_query_agent`` with it.

    The database is closed when the callable returns or raises. Policy errors
    (:class:`~hivemind.errors.InvalidPolicy`, the bridge's ``400 invalid_policy``) are raised before
    any data is read; data errors after.
    """
    policy = resolve_policy(candidate, room_policy)
    with build_scoped_database(items, policy, limits) as database:
        return run_query_agent(database)
