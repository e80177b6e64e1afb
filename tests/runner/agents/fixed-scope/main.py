"""Test scope agent: always the same tables and aggregation (department and salary, averages over 5
or more), keeping the output rules of the room's data_policy when it has one. It logs the prompt it
was given, so tests can check who sees the prompt."""

from hivemind_agent import main

POLICY = {
    "tables": {"people": {"columns": ["department", "salary"]}},
    "aggregate": {"required": True, "min_group_size": 5, "functions": ["COUNT", "SUM", "AVG"]},
}


def decide(ctx):
    ctx.log("input", prompt=ctx.prompt, prompt_visible=ctx.input.stage["prompt_visible"])
    room = ctx.input.stage.get("data_policy")
    return POLICY if room is None else {**POLICY, "output": room["output"]}


if __name__ == "__main__":
    main(decide)
