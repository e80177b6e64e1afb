"""Entry point of the example document search agent (query agent of the document room)."""

from hivemind_agent import main
from search_agent import answer

if __name__ == "__main__":
    main(answer)
