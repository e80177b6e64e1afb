"""Entry point of the default scope agent: compile the room's rules into this run's ScopePolicy."""

from hivemind_agent import main
from scope_agent import decide

if __name__ == "__main__":
    main(decide)
