"""The stream benchmarks' baseline: a Faust worker that only consumes and decodes the facts
topic (the same runtime, topic and message format as the real worker, and nothing else).

    python -m benchmarks.faust_baseline worker -l warn     (FAUST_BASELINE_TOPIC, ..._PORT)
"""

from __future__ import annotations

import os
import time
from typing import Any

import faust

from core.contracts.facts import envelopes_of

TOPIC = os.environ.get("FAUST_BASELINE_TOPIC", "concierge.facts.v1")
app = faust.App(
    os.environ.get("FAUST_BASELINE_ID", "faust-baseline"),
    broker=f"kafka://{os.environ.get('KAFKA_BOOTSTRAP_SERVERS', '127.0.0.1:9092')}",
    store="memory://",
    topic_partitions=6,
    topic_replication_factor=1,
    consumer_auto_offset_reset="earliest",
    web_port=int(os.environ.get("FAUST_BASELINE_PORT", "6099")),
    web_host="127.0.0.1",
    stream_buffer_maxsize=16384,
    datadir=os.environ.get("FAUST_BASELINE_DATADIR", "/tmp/faust-baseline"),
)
facts = app.topic(TOPIC, key_type=bytes, value_type=bytes, key_serializer="raw",
                  value_serializer="raw", partitions=6)  # fmt: skip
state: dict[str, Any] = {"messages": 0, "envelopes": 0, "first": None}


@app.agent(facts)
async def decode(stream: Any) -> None:
    async for value in stream:
        if state["first"] is None:
            state["first"] = time.time()
        state["envelopes"] += len(envelopes_of(value))
        state["messages"] += 1


@app.page("/health")
async def health(web: Any, request: Any) -> Any:
    return web.json({"applied": state["envelopes"], "ignored": 0, **state})


if __name__ == "__main__":
    app.main()
