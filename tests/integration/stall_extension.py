"""A worker extension (CONCIERGE_STREAM_EXTENSIONS) for tests/integration/test_worker_stall.py:
once the worker has handled STALL_AFTER messages of the facts partition STALL_PARTITION, it
pauses that partition in Faust's consumer, the way faust-streaming has been reported to leave
partitions unfetched (issues #166, #629), so the stall watch meets the real thing."""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)


def install(stream: Any) -> None:
    partition = int(os.environ["STALL_PARTITION"])
    after = int(os.environ["STALL_AFTER"])
    done: list[bool] = []

    def pause(changed: int, patient: str, changes: list[Any]) -> None:
        if done or changed != partition or stream.folded_to.get(partition, 0) < after:
            return
        consumer = stream.app.consumer
        held = [tp for tp in consumer.assignment() if tp.topic == stream.facts_name]
        consumer.pause_partitions([tp for tp in held if tp.partition == partition])
        done.append(True)
        log.warning("test extension: paused facts partition %s", partition)

    stream.on_change.append(pause)
