"""Entry point of the example slot mediator (mediator of the negotiation room)."""

from slot_agent import mediate

from hivemind_agent import main

if __name__ == "__main__":
    main(mediate)
