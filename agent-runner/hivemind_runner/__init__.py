"""Hivemind rooms: the confidential runner (DESIGN §6-§8). ``python -m hivemind_runner`` runs it."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hmctl")
except PackageNotFoundError:  # a source checkout that was never installed
    __version__ = "0.0.0+source"
