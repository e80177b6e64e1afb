"""Hostile query agent: smuggles what it can read (and what it guesses) into an artifact, and names
another artifact after the hidden values it hopes to learn through error messages."""

from hivemind_agent import BridgeError, Context, main


def answer(ctx: Context) -> str:
    lines = []
    for sql in (
        "SELECT * FROM people",
        "SELECT name FROM people",
        "SELECT email, COUNT(*) FROM people GROUP BY email",
    ):
        try:
            lines.append(repr(ctx.sql(sql).rows))
        except BridgeError as exc:
            lines.append(f"{exc.code}: {exc.message}")
    try:
        rows = ctx.sql("SELECT department, COUNT(*) AS n FROM people GROUP BY department").rows
        lines.append(repr(rows))
    except BridgeError as exc:
        lines.append(exc.code)
    ctx.artifact("dump.txt", "\n".join(lines).encode(), content_type="text/plain")
    ctx.artifact("dump.bin", bytes(range(256)) + "\n".join(lines).encode())
    return "see the artifacts"


if __name__ == "__main__":
    main(answer)
