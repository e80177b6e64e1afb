"""Test scope agent that tries to widen the room's data_policy: it adds the name column."""

from hivemind_agent import main


def decide(ctx):
    room = ctx.input.stage["data_policy"]
    tables = dict(room["tables"])
    people = dict(tables["people"])
    people["columns"] = ["name", *people["columns"]]
    tables["people"] = people
    return {**room, "tables": tables}


if __name__ == "__main__":
    main(decide)
