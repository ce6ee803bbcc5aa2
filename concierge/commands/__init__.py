"""The verbs of the ``concierge`` command line (``concierge/cli.py`` loads them lazily)."""
