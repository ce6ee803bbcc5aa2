"""A worker joining the group gets partitions, whatever the order members joined in.

CI saw four workers hold six partitions as [4, 5], [], [1, 2], [0, 3]: the member that joined
last got nothing. Faust's assignor, with a table standby replica (Faust's default), caps members
at ceil(6 / 4) = 2 and keeps sticky assignments within the cap. This replays that rebalance
through the worker's own assignor (its configured replicas), no broker needed."""

from __future__ import annotations

from pathlib import Path

from faust.assignor.client_assignment import CopartitionedAssignment
from faust.assignor.copartitioned_assignor import CopartitionedAssignor

from core.settings import Settings
from surveillance_stream.app import create_app


def test_the_member_that_joins_last_gets_partitions(tmp_path: Path) -> None:
    stream = create_app(Settings(home=tmp_path, kafka_bootstrap_servers="127.0.0.1:1"))
    replicas = stream.app.assignor.replicas
    topics = {stream.facts_name, stream.control_name}
    held = {"a": {4, 5}, "c": {1, 2}, "d": {0, 3}, "b": set()}  # b joins last, holding nothing
    cluster = {
        member: CopartitionedAssignment(actives=set(actives), topics=set(topics))
        for member, actives in held.items()
    }
    assignment = CopartitionedAssignor(topics, cluster, 6, replicas).get_assignment()
    actives = {member: sorted(a.actives) for member, a in assignment.items()}
    assert all(actives.values()), actives
    assert sorted(p for a in actives.values() for p in a) == list(range(6)), actives
