"""The status-bar reading, a pure function of the status object: its class, text, tooltip and percentage, and the
waybar, i3bar and one-line forms."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from hybridd.cli.statusbar import CLASSES, bar_class, bar_view, i3bar, i3bar_block, oneline, render, waybar


def model(name: str = "tiny", *, state: str = "stopped", in_flight: int = 0, load: dict[str, Any] | None = None,
          idle_s: float | None = None) -> dict[str, Any]:
    engines = [] if state == "stopped" and load is None else [{"key": f"{name}@4096", "state": state, "load": load}]
    return {"name": name, "state": state, "loaded": state == "ready", "in_flight": in_flight, "idle_s": idle_s,
            "engines": engines}


def peer(name: str = "spark", *, up: bool = True, in_flight: int = 0) -> dict[str, Any]:
    return {"name": name, "up": up, "rtt_ms": 1.25 if up else None, "in_flight": in_flight}


def job(step: int = 30, total: int = 120, status: str = "running") -> dict[str, Any]:
    return {"id": "ftjob-1", "model": "qwen", "status": status, "placement": "peer:spark", "step": step,
            "total_steps": total}


def status(models: list[dict[str, Any]] | None = None, peers: list[dict[str, Any]] | None = None,
           jobs: list[dict[str, Any]] | None = None, decisions: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"version": "0.1.0", "node": "desk", "uptime_s": 125.0, "models": models or [], "peers": peers or [],
            "fine_tuning_jobs": jobs or [], "decisions": decisions or []}


LOADING = {"phase": "reading weights", "elapsed_s": 3.4, "bytes_read": 3 * 2**29, "bytes_total": 2**31}


# --- the class -------------------------------------------------------------------------------------------------


def test_no_status_is_down() -> None:
    assert bar_class(None) == "down"


def test_nothing_configured_or_nothing_happening_is_idle() -> None:
    assert bar_class({}) == "idle"
    assert bar_class(status()) == "idle"
    assert bar_class(status([model(state="ready", idle_s=30)], [peer()])) == "idle"


def test_a_request_on_a_local_engine_is_serving() -> None:
    assert bar_class(status([model(state="ready", in_flight=1)])) == "serving"


def test_a_request_on_a_peer_is_forwarding() -> None:
    assert bar_class(status([model(state="ready")], [peer(in_flight=2)])) == "forwarding"


def test_an_engine_loading_is_loading() -> None:
    assert bar_class(status([model(state="starting", load=LOADING)])) == "loading"


def test_a_running_fine_tune_is_training_and_a_queued_one_is_not() -> None:
    assert bar_class(status(jobs=[job()])) == "training"
    assert bar_class(status(jobs=[job(status="queued")])) == "idle"


def test_a_peer_that_is_down_is_peer_down() -> None:
    assert bar_class(status(peers=[peer(), peer("spark2", up=False)])) == "peer-down"


def test_the_class_says_the_most_immediate_thing_first() -> None:
    everything = status([model("a", state="ready", in_flight=1), model("b", state="starting", load=LOADING)],
                        [peer(in_flight=1), peer("spark2", up=False)], [job()])
    assert bar_class(everything) == "serving"
    everything["models"][0]["in_flight"] = 0
    assert bar_class(everything) == "forwarding"
    everything["peers"][0]["in_flight"] = 0
    assert bar_class(everything) == "loading"
    everything["models"][1] = model("b")
    assert bar_class(everything) == "training"
    everything["fine_tuning_jobs"] = []
    assert bar_class(everything) == "peer-down"
    everything["peers"].pop()
    assert bar_class(everything) == "idle"


def test_fields_an_older_daemon_lacks_count_as_nothing_happening() -> None:
    # A daemon from before peers' in_flight or engines' load: no field, no error, no false class.
    old = {"models": [{"name": "a", "state": "ready", "loaded": True, "in_flight": 0}],
           "peers": [{"name": "spark", "up": True}]}
    assert bar_class(old) == "idle"
    assert bar_class({"models": None, "peers": None, "fine_tuning_jobs": None}) == "idle"


JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                    max_size=4), max_leaves=12)
STATUSLIKE = st.fixed_dictionaries({}, optional={
    "models": st.lists(st.fixed_dictionaries({}, optional={
        "name": st.text(max_size=5), "in_flight": st.integers(0, 3), "loaded": st.booleans(),
        "engines": st.lists(st.fixed_dictionaries({}, optional={"load": st.none() | st.dictionaries(
            st.sampled_from(["phase", "elapsed_s", "bytes_read", "bytes_total"]), JSONISH)}), max_size=2)}),
        max_size=3),
    "peers": st.lists(st.fixed_dictionaries({}, optional={"name": st.text(max_size=5), "up": st.booleans(),
                                                          "in_flight": st.integers(0, 3)}), max_size=3),
    "fine_tuning_jobs": st.lists(st.fixed_dictionaries({}, optional={
        "status": st.sampled_from(["queued", "running"]), "step": st.none() | st.integers(0, 10),
        "total_steps": st.none() | st.integers(0, 10), "model": st.text(max_size=5)}), max_size=2),
    "decisions": st.lists(st.dictionaries(st.text(max_size=5), JSONISH, max_size=3), max_size=2),
    "uptime_s": JSONISH,
})


@given(STATUSLIKE)
@example({"peers": [{"name": "\n"}]})  # a name with a line break once broke the one-line text (Hypothesis found it)
@example({"models": [{"name": "a\rb", "in_flight": 1}]})
def test_any_status_object_gives_a_known_class_and_a_bar_reading(obj: dict[str, Any]) -> None:
    view = bar_view(obj)
    assert view.cls in CLASSES and view.cls != "down"
    assert view.text.startswith("hybridd ") and "\n" not in view.text
    assert 0 <= view.percentage <= 100
    assert json.loads(waybar(view))["class"] == view.cls


# --- the reading -----------------------------------------------------------------------------------------------


def test_down_reading_says_why_in_the_tooltip() -> None:
    view = bar_view(None, "the daemon is not running at http://127.0.0.1:11435 (Connection refused)")
    assert (view.cls, view.text, view.short, view.percentage) == ("down", "hybridd down", "down", 0)
    assert view.tooltip == "hybridd is not running\nthe daemon is not running at http://127.0.0.1:11435 " \
                           "(Connection refused)"


def test_idle_reading_counts_loaded_models_and_names_down_peers() -> None:
    assert bar_view(status()).text == "hybridd idle"
    view = bar_view(status([model("a", state="ready", idle_s=65), model("b")], [peer(up=False)]))
    assert view.cls == "peer-down" and view.text == "hybridd idle, 1 loaded, spark down"
    assert view.tooltip.splitlines() == ["hybridd 0.1.0 on desk, up 2m05s", "a: ready, idle 1m05s", "b: stopped",
                                         "peer spark: down"]


def test_serving_and_forwarding_readings_name_what_and_how_many() -> None:
    view = bar_view(status([model("a", state="ready", in_flight=2), model("b", state="ready", in_flight=1)]))
    assert view.text == "hybridd serving a, b (3)"
    assert "a: ready, 2 in flight" in view.tooltip.splitlines()
    view = bar_view(status([model("a", state="ready")], [peer(in_flight=1)],
                           decisions=[{"model": "big", "placement": "peer:spark"}]))
    assert view.text == "hybridd forwarding to spark (1)"
    assert view.tooltip.splitlines()[-2:] == ["peer spark: up, 1.2 ms, 1 forwarded", "last: big -> peer:spark"]


def test_loading_reading_shows_how_far_the_load_got() -> None:
    view = bar_view(status([model("big", state="starting", load=LOADING)]))
    assert (view.text, view.percentage) == ("hybridd loading big 75%", 75)
    assert "big: starting (reading weights, 75% of 2.0 GiB, 3s)" in view.tooltip.splitlines()
    unknown = {"phase": "starting", "elapsed_s": 1.6, "bytes_read": None, "bytes_total": None}
    view = bar_view(status([model("big", state="starting", load=unknown)]))
    assert (view.text, view.percentage) == ("hybridd loading big 2s", 0)
    assert "big: starting (starting, 2s)" in view.tooltip.splitlines()


def test_training_reading_shows_the_step_and_its_percentage() -> None:
    view = bar_view(status(jobs=[job(30, 120)]))
    assert (view.text, view.percentage) == ("hybridd training qwen 30/120", 25)
    assert "training qwen: step 30/120 on peer:spark" in view.tooltip.splitlines()
    view = bar_view(status(jobs=[job(0, 0)]))
    assert (view.text, view.percentage) == ("hybridd training qwen starting", 0)


# --- the formats -----------------------------------------------------------------------------------------------


def test_waybar_json_has_text_tooltip_class_and_percentage_with_markup_escaped() -> None:
    view = bar_view(status([model("a&b<c>", state="ready", in_flight=1)]))
    out = waybar(view)
    assert "\n" not in out  # waybar reads one JSON object per line
    assert json.loads(out) == {"text": "hybridd serving a&amp;b&lt;c&gt; (1)", "alt": "serving",
                               "tooltip": view.tooltip.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;"),
                               "class": "serving", "percentage": 0}


def test_i3bar_block_has_full_and_short_text_and_a_colour_per_class() -> None:
    assert i3bar_block(bar_view(status())) == {"name": "hybridd", "instance": "idle", "full_text": "hybridd idle",
                                               "short_text": "idle"}
    down = json.loads(i3bar(bar_view(None)))
    assert down == {"name": "hybridd", "instance": "down", "full_text": "hybridd down", "short_text": "down",
                    "color": "#dc322f", "urgent": True}
    serving = i3bar_block(bar_view(status([model(state="ready", in_flight=1)])))
    assert serving["color"] == "#859900" and "urgent" not in serving


def test_oneline_is_the_text_alone() -> None:
    assert oneline(bar_view(status(jobs=[job()]))) == "hybridd training qwen 30/120"
    assert render("oneline", bar_view(None)) == "hybridd down"
