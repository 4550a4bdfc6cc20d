"""The one validator: every failure is the caller's exception, one line naming the path, the problem and the choices."""

from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hybridd import validate
from hybridd.validate import JSON, MSGPACK, TOML, Reader, Wording, field_names


class Refused(Exception):
    """The exception a caller hands the reader."""


def read(value: Any, wording: Wording = TOML, **kwargs: Any) -> Reader:
    return Reader(value, Refused, wording, **kwargs)


def refusal(check: Any) -> str:
    with pytest.raises(Refused) as caught:
        check()
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_paths_name_keys_items_and_entries() -> None:
    doc = read({"models": [{"name": "a"}, {"name": 7}]}).table()
    second = doc.at("models").items()[1].table()
    assert second.path == "models[1]"
    assert refusal(lambda: second.at("name").of(str)) == "models[1].name: expected a string, got an integer"
    options = read({"o": {"n_threads": 1, "a.b": []}}).table().at("o").entries()
    assert [reader.path for reader in options.values()] == ["o.n_threads", 'o."a.b"']  # TOML quotes a dotted key


def test_the_prefix_and_the_error_class_are_the_callers() -> None:
    doc = read({"x": 1}, prefix="cfg.toml: ").table()
    assert refusal(lambda: doc.at("x").of(str)) == "cfg.toml: x: expected a string, got an integer"

    class Other(ValueError):
        pass

    with pytest.raises(Other, match=r"^y: missing$"):
        Reader({}, Other).table().at("y").of(str)


def test_an_unknown_key_lists_the_valid_ones_sorted() -> None:
    assert refusal(lambda: read({"server": {"port": 1}}).table().at("server").table(("listen", "log_level"))) == \
        "server.port: unknown key (valid: listen, log_level)"
    assert refusal(lambda: read({"colour": 1}, JSON).table(("model", "ctx"))) == \
        "unknown field 'colour' (valid: ctx, model)"
    assert refusal(lambda: read({"x": 1}, MSGPACK, path="ping").table(("t",))) == \
        "ping: unknown field 'x' (valid: t)"


def test_a_bool_is_not_an_int_unless_asked_for() -> None:
    doc = read({"ctx": True, "flag": True, "n": 3}).table()
    assert refusal(lambda: doc.at("ctx").integer()) == "ctx: expected an integer, got a boolean"
    assert refusal(lambda: doc.at("ctx").number()) == "ctx: expected a number, got a boolean"
    assert doc.at("flag").of(bool) is True
    assert doc.at("n").of((int, bool)) == 3


def test_defaults_are_returned_unchecked_and_required_keys_are_missing() -> None:
    doc = read({}).table()
    assert doc.at("ctx").integer(8192, low=256) == 8192
    assert doc.at("level").choice(("a", "b"), None) is None
    assert not doc.at("ctx").present
    assert refusal(lambda: doc.at("ctx").integer()) == "ctx: missing"
    assert refusal(lambda: read({}, JSON).table().at("model").of(str)) == "'model' is required"
    assert read({}).table().at("server").table(optional=True).at("x").of(str, "d") == "d"
    assert read({}).table().at("dirs").items(optional=True) == []


def test_json_null_is_a_field_left_out_but_not_in_msgpack() -> None:
    assert read({"ctx": None}, JSON).table().at("ctx").integer(5) == 5
    loaded = read({"loaded_ctx": None}, MSGPACK, path="m").table().at("loaded_ctx")
    assert loaded.present and loaded.value is None
    assert refusal(lambda: loaded.integer()) == "m.loaded_ctx: expected an int, got NoneType"


@pytest.mark.parametrize(("check", "message"), [
    (lambda r: r.integer(above=0), "n: must be > 0, got -1"),
    (lambda r: r.integer(low=0), "n: must be >= 0, got -1"),
    (lambda r: r.integer(high=-2), "n: must be <= -2, got -1"),
    (lambda r: r.integer(low=1, high=4), "n: must be between 1 and 4, got -1"),
    (lambda r: r.number(above=0), "n: must be > 0, got -1"),
])
def test_bounds(check: Any, message: str) -> None:
    assert refusal(lambda: check(read({"n": -1}).table().at("n"))) == message


def test_numbers_are_finite_whatever_the_bounds_and_integers_come_as_floats() -> None:
    doc = read({"inf": float("inf"), "ninf": float("-inf"), "nan": float("nan"), "huge": 10**400, "n": 7}).table()
    for bounds in ({}, {"above": 0}, {"low": 0}, {"high": 1e9}, {"low": 0, "high": 1e9}):
        assert refusal(lambda b=bounds: doc.at("inf").number(**b)) == "inf: must be finite, got inf"
        assert refusal(lambda b=bounds: doc.at("ninf").number(**b)) == "ninf: must be finite, got -inf"
        assert refusal(lambda b=bounds: doc.at("nan").number(**b)) == "nan: must be finite, got nan"
        assert refusal(lambda b=bounds: doc.at("huge").number(**b)) == "huge: must be finite, got inf"
    assert refusal(lambda: read({"t": float("nan")}, MSGPACK, path="ping").table().at("t").number()) == \
        "ping.t: not finite"
    assert doc.at("n").number() == 7.0 and isinstance(doc.at("n").number(), float)


def test_choices_are_listed_in_the_order_given() -> None:
    doc = read({"log_level": "loud"}).table()
    assert refusal(lambda: doc.at("log_level").choice(("debug", "info", "warning"))) == \
        'log_level: unknown value "loud" (valid: debug, info, warning)'
    assert refusal(lambda: read({"role": "admin"}, JSON).table().at("role").choice(("desktop", "peer"))) == \
        "'role' must be one of desktop, peer, got 'admin'"
    assert refusal(lambda: read("job", MSGPACK).choice(("hello", "ping"), what="message type")) == \
        "unknown message type 'job' (valid: hello, ping)"


def test_text_is_non_empty_bounded_and_printable() -> None:
    doc = read({"e": "", "long": "x" * 5, "ctl": "a\nb"}).table()
    assert refusal(lambda: doc.at("e").text()) == "e: must not be empty"
    assert refusal(lambda: doc.at("long").text(max_chars=4)) == "long: must be at most 4 characters, got 5"
    assert refusal(lambda: doc.at("ctl").text(printable=True)) == "ctl: contains control characters"
    assert doc.at("ctl").text() == "a\nb"
    wire = read({"id": ""}, MSGPACK, path="hello").table()
    assert refusal(lambda: wire.at("id").text(max_chars=128)) == "hello.id: length 0 outside 1..128"


def test_arrays_and_maps_are_bounded_and_map_keys_checked() -> None:
    wire = read({"free": {"gpu": -1}, "keys": {b"gpu": 1}, "many": [1, 2, 3]}, MSGPACK, path="capacity").table()
    (gpu,) = wire.at("free").entries(max_key_chars=8).values()
    assert refusal(lambda: gpu.integer(low=0, high=9)) == "capacity.free['gpu']: -1 outside 0..9"
    assert refusal(lambda: wire.at("keys").entries(max_key_chars=8)) == \
        "capacity.keys key: expected a string, got bytes"
    assert refusal(lambda: wire.at("many").items(max_items=2)) == "capacity.many: 3 entries exceed 2"
    assert refusal(lambda: wire.at("free").items()) == "capacity.free: expected an array, got dict"
    assert refusal(lambda: read({"a": [1]}).table().at("a").items(max_items=0)) == \
        "a: must have at most 0 entries, got 1"


def test_a_wanted_kind_can_be_described() -> None:
    doc = read({"x": [1]}).table()
    assert refusal(lambda: doc.at("x").of((str, int, float, bool), want="a string, number or boolean")) == \
        "x: expected a string, number or boolean, got an array"


def test_fail_words_a_problem_of_the_callers_own_at_the_path() -> None:
    doc = read({"type_v": "q8_0"}, prefix="cfg.toml: ").table()
    error = doc.at("type_v").fail('a quantized V cache ("q8_0") needs flash_attn = true')
    assert isinstance(error, Refused)
    assert str(error) == 'cfg.toml: type_v: a quantized V cache ("q8_0") needs flash_attn = true'
    assert str(read({}).fail("not a map")) == "not a map"  # at the top: the problem alone


def test_reading_a_key_of_an_unchecked_value_is_a_programming_error() -> None:
    with pytest.raises(TypeError, match="not checked to be a table"):
        read([1]).at("x")


def test_field_names_are_the_keys_of_a_table_that_spells_out_a_dataclass() -> None:
    @dataclass(frozen=True)
    class Point:
        x: int
        y: int = 0

    assert field_names(Point) == ("x", "y")
    assert refusal(lambda: read({"z": 1}).table(field_names(Point))) == "z: unknown key (valid: x, y)"


def test_a_wording_is_a_value_a_caller_may_vary() -> None:
    settings = dataclasses.replace(TOML, quote=repr)
    assert refusal(lambda: read({"type_k": "q9"}, settings).table().at("type_k").choice(("f16",), what="cache type")) \
        == "type_k: unknown cache type 'q9' (valid: f16)"


def test_the_validator_is_pure() -> None:
    tree = ast.parse(Path(validate.__file__).read_text(encoding="utf-8"))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    # No I/O and nothing of hybridd's: every layer may use it.
    assert imported <= {"__future__", "collections.abc", "dataclasses", "ipaddress", "json", "math", "re", "typing"}
