"""Test helpers shared across test suites (servers and fakes that stand in for external services)."""
