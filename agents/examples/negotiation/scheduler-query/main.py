"""Entry point of the example scheduler (query agent of the negotiation room)."""

from scheduler_agent import answer

from hivemind_agent import main

if __name__ == "__main__":
    main(answer)
