"""Hivemind rooms: the ``hmctl`` command-line client (``hmctl.main:app``).

``hmctl.client`` (the HTTP API client) and ``hmctl.profiles`` (profiles and per-profile state) are the
library other tools build on; ``hmctl.verify`` holds the client-side verification steps.
"""

__version__ = "0.1.0"
