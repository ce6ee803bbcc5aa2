"""Shared core of the concierge: settings, the CLI and the fact types every package speaks."""
