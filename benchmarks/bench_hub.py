"""The hub's answer with three nodes, p50 and p99, beside the slowest single node's own answer
in the same run.

Three nodes (``concierge api`` processes, own topic prefixes, keys and synthetic populations of
different sizes) and a hub (``concierge hub serve``) start on the broker of
``KAFKA_BOOTSTRAP_SERVERS`` (:class:`concierge.federated_demo.Federation`). Each repeat times,
over HTTP from this process, the hub's protected answer (``POST /v1/hub/ask``: the fan-out, each
node's answer under its own disclosure control, signatures, the combination) and each node's
own sponsor answer to the same question (``POST /v1/feasibility/ask``), in a rotating order so
drift on a shared machine hits each alike. After the first ask every answer is a republication
at its node (the same question from the same organisation), on both paths alike. The baseline is
the node whose own answers are slowest (by p50) in this run.

    KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:29492 nice -n 5 python -m benchmarks.bench_hub \
        --scale 0.3 --repeats 60
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import write_result
from concierge.federated_demo import NODES, T2DM, Federation


def percentile(samples: list[float], q: float) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[int(q) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--root", type=Path, default=None)
    args = parser.parse_args()
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    root = args.root or Path(tempfile.mkdtemp(prefix="bench-hub-"))
    nodes = {n: (max(20, int(p * args.scale)), s) for n, (p, s) in NODES.items()}
    load_before = os.getloadavg()
    with Federation(root, bootstrap, nodes) as federation:
        federation.start()
        first = federation.ask_hub(T2DM)  # warm-up: the first answer compiles the engine
        assert not first["partial"], first["nodes_missing"]
        for name in nodes:
            federation.ask_node(name, T2DM)
        hub_ms: list[float] = []
        node_ms: dict[str, list[float]] = {n: [] for n in nodes}
        partial = 0
        calls = ["hub", *nodes]
        for i in range(args.repeats):
            k = i % len(calls)
            for call in calls[k:] + calls[:k]:
                started = time.perf_counter()
                if call == "hub":
                    answer = federation.ask_hub(T2DM)
                    hub_ms.append((time.perf_counter() - started) * 1000)
                    partial += bool(answer["partial"])
                else:
                    federation.ask_node(call, T2DM)
                    node_ms[call].append((time.perf_counter() - started) * 1000)
    load_after = os.getloadavg()
    slowest = max(node_ms, key=lambda n: statistics.median(node_ms[n]))
    parameters = {"nodes": nodes, "repeats": args.repeats, "question": T2DM["title"]}
    command = "python -m benchmarks.bench_hub " + " ".join(sys.argv[1:])
    extra = {
        "slowest_node": slowest,
        "partial_answers": partial,
        "node_p50_ms": {n: round(statistics.median(v), 1) for n, v in node_ms.items()},
        "node_p99_ms": {n: round(percentile(v, 99), 1) for n, v in node_ms.items()},
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "baseline_is": "the slowest node's own sponsor answer (POST /v1/feasibility/ask), "
        "same run, same question",
    }
    for name, value, baseline in (
        ("hub_answer_p50", statistics.median(hub_ms), statistics.median(node_ms[slowest])),
        ("hub_answer_p99", percentile(hub_ms, 99), percentile(node_ms[slowest], 99)),
    ):
        result = write_result(
            name,
            value,
            "milliseconds",
            baseline,
            parameters,
            command,
            extra=extra,
            higher_is_better=False,
        )
        print(f"{name}: {result['value']} ms vs {slowest} {result['baseline']} ms")


if __name__ == "__main__":
    main()
