"""Entry point of the example median agent (a participant's own query agent)."""

from hivemind_agent import main
from median_agent import answer

if __name__ == "__main__":
    main(answer)
