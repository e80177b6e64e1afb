"""Entry point of the default scope agent: compile the room's rules into this run's ScopePolicy."""

from scope_agent import decide

from hivemind_agent import main

if __name__ == "__main__":
    main(decide)
