"""Test query agent that never answers."""

import time

from hivemind_agent import main


def answer(ctx):
    time.sleep(3600)
    return "too late"


if __name__ == "__main__":
    main(answer)
