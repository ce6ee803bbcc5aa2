"""The regulator's Streamlit dashboard (:mod:`.regulator`): an HTTP client of the API's
``/v1/surveillance`` routes (:mod:`.client`), with its own settings section (:mod:`.settings`).

It imports no domain package; ``concierge dashboard`` serves it. See
``docs/explanation/architecture.md``.
"""
