"""A worker that dies in native code leaves its Python stacks in its log.

A ``concierge worker`` started by the federation tests once died with SIGSEGV right after
start-up and left an empty log. :class:`WorkerProcess` runs workers with ``faulthandler`` on
(``PYTHONFAULTHANDLER=1``); this checks, on a real worker, that a segmentation fault then
writes every thread's stack to the log and that :meth:`WorkerProcess.report` names the signal.
"""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path

import pytest

from infra.topics_admin import ensure_topics

from .worker_proc import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_segfaulting_worker_leaves_its_stacks_and_the_signal(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    prefix = f"t-crash-{uuid.uuid4().hex[:8]}."
    ensure_topics(kafka_bootstrap, prefix)
    worker = WorkerProcess(kafka_bootstrap, prefix, tmp_path / "home", tmp_path / "worker.log")
    try:
        worker.start()
        worker.wait_until(lambda h: True, timeout=120, path="/health")
        assert worker.proc is not None
        # what a crash in librdkafka or another C extension raises in the process
        os.kill(worker.proc.pid, signal.SIGSEGV)
        assert worker.proc.wait(30) == -signal.SIGSEGV
        log = worker.log_path.read_text(errors="replace")
        assert "Fatal Python error: Segmentation fault" in log, log[-2000:]
        assert "most recent call first" in log, log[-2000:]
        report = worker.report()
        assert "exited by signal SIGSEGV (-11)" in report, report
        assert "Fatal Python error: Segmentation fault" in report
    finally:
        worker.stop()
