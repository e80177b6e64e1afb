"""Test query agent: answers with the wall-clock time at which its process started (taken before its
first bridge call), so tests can tell whether it was started before its stage began."""

import time

STARTED = time.time()

from hivemind_agent import main  # noqa: E402


def answer(ctx):
    return {"started": STARTED}


if __name__ == "__main__":
    main(answer)
