"""Probe agent for the sandbox tests.

Without a probe it behaves: it reads its input, runs one SQL call and posts the answer. With a probe
(Python source in the stage input, fetched over the bridge like any prompt) it runs it and posts the
probe's ``result``. Hostile probes try to get out; the tests check that they cannot.
"""

import os

from hivemind_agent import Context, main


def handle(ctx: Context) -> object:
    probe = ctx.input.stage.get("probe")
    if probe is None:
        count = ctx.sql("SELECT COUNT(*) AS n FROM orders").rows[0][0]
        return {"prompt": ctx.prompt, "orders": count, "uid": os.getuid(), "gid": os.getgid()}
    scope = {"ctx": ctx, "result": None}
    exec(probe, scope)  # running hostile code is the point of this agent
    return scope["result"]


if __name__ == "__main__":
    main(handle)
