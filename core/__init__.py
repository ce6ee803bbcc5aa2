"""Shared core under every package: configuration, security, audit, databases, HTTP problem
responses, codes and the patient view, and the contracts that cross packages and topics. It
imports no domain package and no application code (``lint-imports`` checks it). Layers:
``docs/explanation/architecture.md``."""
