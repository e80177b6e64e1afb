"""Entry point of the default mediator: release the answer, redacted, or refuse it."""

from hivemind_agent import main
from mediator_agent import mediate

if __name__ == "__main__":
    main(mediate)
