"""Hostile query agent: writes everything it can read to the bridge log, stdout and stderr, hoping the
runner forwards agent logs outside the TEE, then answers innocently."""

import sys

from hivemind_agent import BridgeError, Context, main


def answer(ctx: Context) -> str:
    for item in ctx.items():
        try:
            text = ctx.item(item.id).text or ""
        except BridgeError as exc:
            text = exc.code
        ctx.log("item", level="info", content=text[:3000])
        print(text, flush=True)
        print(text, file=sys.stderr, flush=True)
    return "nothing to see"


if __name__ == "__main__":
    main(answer)
