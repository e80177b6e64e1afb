"""A run row with its billing hold, in any state: what the settle and janitor tests start from."""

from __future__ import annotations

from hivemind.models import Budgets, RunStatus
from hivemind.store import Store
from hivemind.store.runs import RunRecord, RunResult
from hivemind.tokens import random_id


def held_run(
    store: Store,
    tenant_id: str,
    *,
    room_id: str,
    hold: int,
    budgets: Budgets,
    status: RunStatus,
    runner_id: str,
) -> str:
    """Hold ``hold`` for a new run of ``room_id`` and move it to ``status`` through the store's
    transitions (terminal runs fail with ``boom`` unless completed). Returns the run id."""
    run_id = random_id("run")
    now = store.clock()
    store.billing.hold(tenant_id, run_id, hold, enforce=True)
    store.runs.create(
        RunRecord(
            run_id=run_id,
            room_id=room_id,
            caller_id=tenant_id,
            payer_tenant_id=tenant_id,
            budgets=budgets,
            hold=hold,
            prompt_sha256="0" * 64,
            manifest_hash="1" * 64,
            envelope_key=f"runs/{run_id}/envelope",
            created_at=now,
            updated_at=now,
        )
    )
    if status is not RunStatus.PENDING:
        store.runs.start(run_id, runner_id)
    if status.terminal:
        store.runs.finish(
            run_id, status, RunResult(error_code=None if status is RunStatus.COMPLETED else "boom")
        )
    return run_id
