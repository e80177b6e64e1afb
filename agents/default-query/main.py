"""Entry point of the default query agent: answer the prompt within the room's scope."""

from hivemind_agent import main
from query_agent import answer

if __name__ == "__main__":
    main(answer)
