"""A sleeping peer that Wake-on-LAN can wake is a placement option timed with its wake; pure, no I/O."""

from __future__ import annotations

from dataclasses import replace

import pytest

from hybridd.place.scheduler import PeerState
from hybridd.place.state import Forward, PeerOnlyArrived, PeersReported, PlacementState, Refuse, apply
from tests.test_scheduler import DESKTOP, SPARK, Node, need, option, spark_peer

WAKE_S = 60.0


def asleep(*models: str, wake_s: float = WAKE_S) -> PeerState:
    """The Spark as its pairing last knew it: down, but with a MAC to wake it by."""
    return spark_peer(*models, up=False, wakeable=True, wake_s=wake_s)


def test_a_sleeping_peer_is_planned_for_with_its_wake_time_in_the_prediction() -> None:
    request = need("gpt-oss-120b", prompt=8000, max_tokens=8000)
    awake = Node().decide(request, (spark_peer("gpt-oss-120b"),))
    sleeping = Node().decide(request, (asleep("gpt-oss-120b"),))
    assert sleeping.placement == "peer:spark" and sleeping.chosen is not None
    woken, up = option(sleeping, "peer:spark"), option(awake, "peer:spark")
    assert woken.wake_s == WAKE_S and woken.wait_s == up.wait_s + WAKE_S
    assert woken.total_s == pytest.approx(up.total_s + WAKE_S)  # the same sum in another order
    assert woken.predicted_tok_s == up.predicted_tok_s  # the wake delays the answer; it does not slow it
    assert ", waking spark (~60 s)" in sleeping.reason, sleeping.reason


def test_a_peer_that_is_down_and_cannot_be_woken_is_still_no_option() -> None:
    request = need("gpt-oss-120b", prompt=8000, max_tokens=2000)
    down = Node().decide(request, (spark_peer("gpt-oss-120b", up=False),))
    assert down.placement != "peer:spark"
    assert any(o.placement == "peer:spark" and o.why_not == "spark is down" for o in down.options)


def test_a_local_option_that_finishes_sooner_than_the_wake_wins() -> None:
    # GPT-OSS-120B with its experts in DDR5 runs at about half the Spark's speed: with the Spark up it goes there
    # (test_gpt_oss_120b_goes_to_the_spark), but a short answer is done locally before a sleeping Spark is awake.
    short = need("gpt-oss-120b", prompt=500, max_tokens=200)
    up = Node().decide(short, (spark_peer("gpt-oss-120b"),))
    assert up.placement == "peer:spark"
    sleeping = Node().decide(short, (asleep("gpt-oss-120b"),))
    assert sleeping.placement == "local-offload", sleeping.reason
    assert "spark predicted" in sleeping.reason and "waking it first (~60 s)" in sleeping.reason, sleeping.reason
    # a quick wake (a Spark that only suspended) makes the peer worth waking again
    quick = Node().decide(short, (asleep("gpt-oss-120b", wake_s=1.0),))
    assert quick.placement == "peer:spark" and ", waking spark (~1 s)" in quick.reason, quick.reason


def test_a_sleeping_peer_is_planned_as_idle_whatever_it_had_loaded_and_queued() -> None:
    # what a sleeping peer last reported of its engines and queue says nothing of the peer once it is awake
    request = need("gpt-oss-120b", prompt=8000, max_tokens=2000)
    stale = replace(asleep("gpt-oss-120b"), loaded={"gpt-oss-120b": 131072}, queue_depth=9,
                    backlog_s={"gpt-oss-120b": 900.0})
    d = Node().decide(request, (stale,))
    chosen = option(d, "peer:spark")
    assert chosen.load_s > 0 and chosen.wait_s == WAKE_S


def test_a_model_that_fits_only_a_sleeping_peer_goes_there_rather_than_refused() -> None:
    long = need("qwen3-coder-30b-a3b", prompt=240_000, max_tokens=8000)
    node = Node()
    node.with_capacity("host", 2)  # no room to spill anything to system RAM
    refused = node.decide(long, (spark_peer("qwen3-coder-30b-a3b", up=False),))
    assert refused.placement == "none" and refused.status == 503
    woken = node.decide(long, (asleep("qwen3-coder-30b-a3b"),))
    assert woken.placement == "peer:spark" and woken.ctx == 262144
    assert woken.chosen is not None and woken.chosen.need_bytes <= SPARK.devices[0].usable_bytes


def test_a_model_only_a_sleeping_peer_knows_goes_to_it_to_be_woken() -> None:
    def arrive(*peers: PeerState) -> tuple[object, ...]:
        state = apply(PlacementState.empty(DESKTOP), PeersReported({p.name: p for p in peers}), 0.0).state
        return apply(state, PeerOnlyArrived("gpt-oss-120b", 100), 1.0).effects

    [forward] = arrive(asleep("gpt-oss-120b"))
    assert forward == Forward("spark", "peer:spark: only spark serves 'gpt-oss-120b', waking spark (~60 s)")
    awake = replace(spark_peer("gpt-oss-120b"), name="twin")
    [forward] = arrive(asleep("gpt-oss-120b"), awake)  # one that is up goes first
    assert forward == Forward("twin", "peer:twin: only twin serves 'gpt-oss-120b'")
    [refused] = arrive(spark_peer("gpt-oss-120b", up=False))
    assert isinstance(refused, Refuse) and refused.status == 503
