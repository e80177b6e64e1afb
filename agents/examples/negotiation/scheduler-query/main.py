"""Entry point of the example scheduler (query agent of the negotiation room)."""

from hivemind_agent import main
from scheduler_agent import answer

if __name__ == "__main__":
    main(answer)
