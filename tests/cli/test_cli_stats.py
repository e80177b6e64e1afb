"""``hmctl run stats``: percentiles, tool calls, tokens and cost from run rows and the payer's ledger."""

from __future__ import annotations

from hmctl.runs import charges_by_run, run_stats


def run(run_id: str, status: str, *stages: tuple[str, int, dict[str, int], int, int]) -> dict:
    return {
        "run_id": run_id,
        "status": status,
        "usage": [
            {
                "stage": stage,
                "duration_ms": ms,
                "tool_calls": tools,
                "llm_calls": calls,
                "prompt_tokens": tokens,
                "completion_tokens": tokens // 2,
            }
            for stage, ms, tools, calls, tokens in stages
        ],
    }


def test_percentiles_per_stage_over_runs() -> None:
    runs = [run(f"run_{i}", "completed", ("query", 1000 * i, {"sql": i}, 1, 10)) for i in range(1, 21)]
    stats = run_stats(runs, charges=None)
    assert stats["stages"]["query"] == {"runs": 20, "p50_s": 10.5, "p95_s": 19.05}
    assert stats["tool_calls"] == {"sql": 210} and stats["llm_calls"] == 20
    assert (stats["prompt_tokens"], stats["completion_tokens"]) == (200, 100)
    assert stats["cost_micro_usd"] is None


def test_stages_are_reported_in_pipeline_order_and_failed_runs_count() -> None:
    runs = [
        run("run_a", "completed", ("mediator", 500, {}, 0, 0), ("scope", 2000, {"schema": 1}, 0, 0)),
        run("run_b", "failed", ("scope", 4000, {"sql": 2, "schema": 1}, 2, 7)),
    ]
    stats = run_stats(runs, charges={"run_a": 1500, "run_b": 250, "run_other": 999})
    assert list(stats["stages"]) == ["scope", "mediator"]
    assert stats["stages"]["scope"]["p50_s"] == 3.0
    assert stats["statuses"] == {"completed": 1, "failed": 1}
    assert stats["tool_calls"] == {"schema": 2, "sql": 2}
    assert stats["cost_micro_usd"] == 1750


def test_charges_come_from_usage_charge_entries_only() -> None:
    entries = [
        {"kind": "usage_hold", "ref": "run_a", "amount": 0},
        {"kind": "usage_charge", "ref": "run_a", "amount": -1200},
        {"kind": "usage_release", "ref": "run_a", "amount": 0},
        {"kind": "credit_grant", "ref": "grant", "amount": 5_000_000},
        {"kind": "usage_charge", "ref": "run_b", "amount": -300},
    ]
    assert charges_by_run(entries) == {"run_a": 1200, "run_b": 300}


def test_no_runs_gives_empty_stats() -> None:
    assert run_stats([], charges={}) == {
        "runs": 0,
        "statuses": {},
        "stages": {},
        "tool_calls": {},
        "llm_calls": 0,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "cost_micro_usd": 0,
    }
