"""Test query agent that gives up on the bridge after half a second (a client timeout shorter than
the runner's pre-start wait) and answers with the time its process started."""

import sys
import time

STARTED = time.time()

from hivemind_agent import Bridge, run  # noqa: E402


def answer(ctx):
    return {"started": STARTED}


if __name__ == "__main__":
    sys.exit(run(answer, bridge=Bridge.from_env(timeout=0.5)))
