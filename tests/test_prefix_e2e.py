"""End to end: a real daemon and the tiny model; an agent's second turn goes where its first left the prefix."""

from __future__ import annotations

from pathlib import Path

from tests.test_serve_e2e import NO_EOS, client, tiny_config


def test_the_next_turn_of_a_conversation_is_placed_on_the_prefix_its_engine_holds(daemon_factory,
                                                                                   tiny_model: Path) -> None:
    daemon = daemon_factory(tiny_config(tiny_model))
    api = client(daemon)
    system = {"role": "system", "content": "You are a coding agent. Tools: read, edit, run. " * 12}
    turn1 = [system, {"role": "user", "content": "Fix the failing test in tests/test_add.py."}]

    first = api.chat.completions.with_raw_response.create(model="tiny", messages=turn1, max_tokens=8,
                                                          logit_bias=NO_EOS)
    assert first.headers["x-hybridd-placement"] == "local"
    assert "prefix cached" not in first.headers["x-hybridd-reason"]
    answer = first.parse().choices[0].message.content or ""

    turn2 = [*turn1, {"role": "assistant", "content": answer},
             {"role": "user", "content": "Now run the whole suite."}]
    second = api.chat.completions.with_raw_response.create(model="tiny", messages=turn2, max_tokens=8,
                                                           logit_bias=NO_EOS)
    reason = second.headers["x-hybridd-reason"]
    assert second.headers["x-hybridd-placement"] == "local"
    assert "local: engine tiny@4096 loaded" in reason and "prefix cached: " in reason
    cached, prompt = reason.split("prefix cached: ")[1].split(" tokens")[0].replace(",", "").split(" of ")
    assert 256 <= int(cached) < int(prompt)  # the first turn's whole blocks, not the new messages

    other = [{"role": "system", "content": "You review pull requests. " * 20},
             {"role": "user", "content": "Review this."}]
    third = api.chat.completions.with_raw_response.create(model="tiny", messages=other, max_tokens=8,
                                                          logit_bias=NO_EOS)
    assert "prefix cached" not in third.headers["x-hybridd-reason"]  # another conversation holds nothing there
