"""Entry point of the example median agent (a participant's own query agent)."""

from median_agent import answer

from hivemind_agent import main

if __name__ == "__main__":
    main(answer)
