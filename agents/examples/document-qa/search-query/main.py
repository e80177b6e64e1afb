"""Entry point of the example document search agent (query agent of the document room)."""

from search_agent import answer

from hivemind_agent import main

if __name__ == "__main__":
    main(answer)
