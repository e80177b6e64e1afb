"""Command groups of ``hmctl``: one module per group, each exposing a typer ``app`` (or ``register``)."""
