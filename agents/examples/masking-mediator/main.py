"""Entry point of the example masking mediator."""

from masking_agent import mediate

from hivemind_agent import main

if __name__ == "__main__":
    main(mediate)
