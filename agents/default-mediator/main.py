"""Entry point of the default mediator: release the answer, redacted, or refuse it."""

from mediator_agent import mediate

from hivemind_agent import main

if __name__ == "__main__":
    main(mediate)
