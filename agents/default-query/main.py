"""Entry point of the default query agent: answer the prompt within the room's scope."""

from query_agent import answer

from hivemind_agent import main

if __name__ == "__main__":
    main(answer)
