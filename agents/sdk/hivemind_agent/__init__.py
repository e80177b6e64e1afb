"""Hivemind rooms."""
