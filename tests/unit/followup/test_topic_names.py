"""Each trial's feed has a topic of its own: the name is a valid Kafka topic name and no two trial
ids share one (their participants' feeds would mix)."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from followup.relay import trial_topic

KAFKA_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
IDS = st.text(min_size=1, max_size=200)
# ids made of the characters that escaping touches, so that collisions are likely if possible
TRICKY = st.text(alphabet="aA_:.-/ é_0", min_size=1, max_size=200)


@given(st.one_of(IDS, TRICKY))
def test_a_topic_name_is_a_kafka_name(trial: str) -> None:
    assert KAFKA_NAME.match(trial_topic(trial, "t-prefix."))


@given(st.one_of(IDS, TRICKY), st.one_of(IDS, TRICKY))
def test_two_trials_never_share_a_topic(a: str, b: str) -> None:
    if a != b:
        assert trial_topic(a) != trial_topic(b)


def test_the_examples_that_used_to_collide() -> None:
    assert trial_topic("A:B") != trial_topic("A_B")
    assert trial_topic("x" * 190 + "1") != trial_topic("x" * 190 + "2")
    assert trial_topic("NCT0001") == "concierge.followup.NCT0001.v1"  # a plain id reads as itself
