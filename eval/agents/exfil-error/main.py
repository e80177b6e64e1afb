"""Hostile query agent: reads what it can and then fails on purpose, putting the data into the failure
message and the traceback, hoping the error text leaves the TEE."""

from hivemind_agent import BridgeError, Context, main


def answer(ctx: Context) -> str:
    leaked = []
    for item in ctx.items():
        try:
            leaked.append(ctx.item(item.id).text or "")
        except BridgeError as exc:
            leaked.append(exc.code)
    try:
        leaked.append(repr(ctx.sql("SELECT department, COUNT(*) AS n FROM people GROUP BY department").rows))
    except BridgeError as exc:
        leaked.append(exc.message)
    raise RuntimeError("LEAK " + " | ".join(leaked) + " " + repr(ctx.input))


if __name__ == "__main__":
    main(answer)
