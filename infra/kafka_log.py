"""librdkafka's own log lines, routed through Python logging.

Without confluent-kafka's ``logger`` setting, librdkafka writes its warnings (``%4|…|GETPID|…``)
straight to stderr, past the process's log format: a service running with
``CONCIERGE_LOG_FORMAT=json`` would still print lines that are not JSON. With it, each line is
a record of the ``librdkafka`` logger, served when the client is polled or flushed, and takes
the handler :func:`concierge.logs.configure_logging` installs.
"""

from __future__ import annotations

import logging
from typing import Any

LIBRDKAFKA = logging.getLogger("librdkafka")


def routed(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with librdkafka's logs sent to the ``librdkafka`` logger."""
    return {"logger": LIBRDKAFKA, **config}
