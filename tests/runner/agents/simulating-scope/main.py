"""Test scope agent: simulates the room's query agent under its candidate policy before returning it,
and logs what the simulation produced (the test reads the run's diagnostics)."""

from hivemind_agent import InvalidRequest, main

POLICY = {
    "tables": {"people": {"columns": ["department", "salary"]}},
    "aggregate": {"required": True, "min_group_size": 5, "functions": ["COUNT", "AVG"]},
}


def decide(ctx):
    result = ctx.simulate(POLICY, ctx.prompt or "average salary by department")
    ctx.log("simulated", output=result.output, error=result.error_code)
    try:
        ctx.simulate({"tables": {"people": {"columns": ["salary"], "where": "lower(name) = 'x'"}}}, "q")
    except InvalidRequest as exc:
        ctx.log("refused", code=exc.code)
    files = ctx.input.stage["query_agent"]["files"] or {}
    ctx.log("query agent", files=sorted(files), digest=ctx.input.stage["query_agent"]["digest"])
    return POLICY


if __name__ == "__main__":
    main(decide)
