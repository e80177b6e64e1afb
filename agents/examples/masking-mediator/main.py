"""Entry point of the example masking mediator."""

from hivemind_agent import main
from masking_agent import mediate

if __name__ == "__main__":
    main(mediate)
