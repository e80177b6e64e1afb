"""Hivemind rooms: the control plane (Lambda handlers: the API, settlement, the janitor)."""

__version__ = "0.1.0"
