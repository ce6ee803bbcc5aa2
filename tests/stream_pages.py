"""The stream worker's status pages in this process, without a broker.

:func:`serve_pages` builds the real Faust app (:func:`surveillance_stream.app.create_app`, with the
device extension), fills its patient store with envelopes the test gives, and serves its web
application (Faust's aiohttp application, the very pages ``concierge worker`` serves) on a
loopback port from a thread of its own. Nothing else of the worker runs: no agent, no table
recovery, no broker; ``/readyz`` says it is not connected, which is true.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from core.contracts.facts import ResourceFacts
from core.settings import Settings
from surveillance_stream.app import StreamApp, create_app
from tests.faults import free_port


@dataclass
class Pages:
    url: str
    stream: StreamApp

    def paths(self) -> set[str]:
        """Every path template the worker's web application routes."""
        return {
            route.resource.canonical
            for route in self.stream.app.web.web_app.router.routes()  # type: ignore[attr-defined]
            if route.resource is not None
        }


@contextmanager
def serve_pages(settings: Settings, envelopes: Iterable[ResourceFacts] = ()) -> Iterator[Pages]:
    stream = create_app(settings)
    for envelope in envelopes:
        stream.store.apply(0, orjson.loads(envelope.to_json()))
    application: Any = stream.app.web.web_app  # type: ignore[attr-defined]
    port = free_port()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    runner = web.AppRunner(application)

    async def start() -> None:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        started.set()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        loop.run_forever()

    thread = threading.Thread(target=run, name="worker-pages", daemon=True)
    thread.start()
    assert started.wait(30), "the worker's pages did not start"
    try:
        yield Pages(f"http://127.0.0.1:{port}", stream)
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()
        stream.access.close()


__all__ = ["Pages", "serve_pages"]
