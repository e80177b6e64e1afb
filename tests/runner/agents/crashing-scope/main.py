"""Test scope agent that fails with an exception whose text holds room data."""

from hivemind_agent import main


def decide(ctx):
    rows = ctx.sql("SELECT name FROM people LIMIT 1").rows
    raise ValueError(f"cannot decide for {rows[0][0]}")


if __name__ == "__main__":
    main(decide)
