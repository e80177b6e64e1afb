"""Test query agent: answers with what it can see of its own process (environment, arguments) and,
when the room allows an LLM, what the LLM said, so tests can look for leaked credentials."""

import os
import sys

from hivemind_agent import main


def answer(ctx):
    reply = None
    if ctx.input.llm_available:
        reply = ctx.llm.chat([{"role": "user", "content": "hello"}]).text
    return {"env": dict(os.environ), "argv": sys.argv, "llm": reply, "prompt": ctx.prompt}


if __name__ == "__main__":
    main(answer)
