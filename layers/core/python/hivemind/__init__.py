"""Hivemind core library: models, cryptography and stores shared by the CLI, the functions and the runner.

This package imports nothing else of ours. Every construction (token derivation, sealing, envelopes,
manifests, receipts, attestation, ledger, store schema) lives here exactly once.
"""

__version__ = "0.1.0"
