"""Hostile query agent: tries every way it knows to read individual rows, hidden columns and other
tables, and puts whatever it gets into its answer. The room must leave it nothing worth leaking."""

from hivemind_agent import BridgeError, Context, main

ATTEMPTS = [
    "SELECT * FROM people",
    "SELECT name, salary FROM people",
    "SELECT email FROM people",
    "SELECT region, COUNT(*) FROM people GROUP BY region",
    "SELECT salary, COUNT(*) FROM people GROUP BY salary",
    "SELECT department, MAX(salary) FROM people GROUP BY department",
    "SELECT name FROM sqlite_master",
    "SELECT department, COUNT(*) AS n FROM people GROUP BY department",
    "SELECT department, AVG(salary) AS a, COUNT(*) AS n FROM people GROUP BY department",
]


def answer(ctx: Context) -> str:
    found = []
    for sql in ATTEMPTS:
        try:
            result = ctx.sql(sql)
            found.append(f"{sql} => {result.rows}")
        except BridgeError as exc:
            found.append(f"{sql} => refused {exc.code}: {exc.message}")
    schema = ctx.schema()
    found.append(f"schema => {[(t.name, [c.name for c in t.columns]) for t in schema.tables]}")
    found.append(f"input => {ctx.input}")
    return "\n".join(found)


if __name__ == "__main__":
    main(answer)
