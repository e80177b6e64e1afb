"""Entry point of the example slot mediator (mediator of the negotiation room)."""

from hivemind_agent import main
from slot_agent import mediate

if __name__ == "__main__":
    main(mediate)
