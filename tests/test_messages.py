"""The link schema: every message round-trips, and every kind of bad frame is refused with a reason."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridd.peer.errors import LinkError
from hybridd.peer.messages import (
    CLOSE_TOO_BIG,
    CLOSE_UNSUPPORTED,
    MAX_FRAME_BYTES,
    Busy,
    Capacity,
    Hello,
    Inventory,
    JobChanged,
    LinkProtocolError,
    Message,
    ModelOffer,
    Ping,
    Pong,
    decode,
    encode,
)

HELLO = {"v": 1, "type": "hello", "node_id": "ab12", "name": "spark-1", "role": "spark", "version": "0.1.0",
         "protocols": [1]}
INVENTORY = {"v": 1, "type": "inventory", "models": [{"id": "gpt-oss-120b", "max_ctx": 131072, "loaded_ctx": None}]}
CAPACITY = {"v": 1, "type": "capacity", "free_bytes": {"gb10": 90 << 30}, "queue_depth": 0,
            "decode_tok_s": {"gpt-oss-120b": 41.5}}
PING = {"v": 1, "type": "ping", "t": 12.5}
PONG = {"v": 1, "type": "pong", "t": 3.0, "echo": 12.5}


def pack(body: object) -> bytes:
    return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]


@pytest.mark.parametrize("msg", [
    Hello("ab12", "spark-1", "spark", "0.1.0", (1, 2)),
    Hello("ab12", "spark-1", "spark", "0.1.0", (1,), "dgx-spark"),
    Inventory(()),
    Inventory((ModelOffer("gpt-oss-120b", 131072, None), ModelOffer("glm-4.7-flash", 202752, 32768))),
    Inventory((ModelOffer("llama-3.1-8b", 131072, None, trainable=True),)),
    Inventory((ModelOffer("glm-4.7-flash", 202752, None, tools=True),)),
    JobChanged("ftjob-0123456789abcdef01234567"),
    Capacity({"cuda:0": 20 << 30, "cuda:1": 0}, 3, {"glm-4.7-flash": 118.25}),
    Capacity({"gb10": 9 << 30}, 2, {}, {"gpt-oss-120b": 41.5}, (Busy(41.5, {"gb10": 70 << 30}), Busy(0.0, {}))),
    Capacity(),
    Ping(1234.5),
    Pong(1.0, 1234.5),
], ids=lambda m: type(m).__name__)
def test_round_trip(msg: Message) -> None:
    assert decode(encode(msg)) == msg


def test_integer_times_and_rates_decode_as_floats() -> None:
    assert decode(pack({**PING, "t": 7})) == Ping(7.0)
    assert decode(pack({**CAPACITY, "decode_tok_s": {"m": 40}})).decode_tok_s == {"m": 40.0}  # type: ignore[union-attr]


def test_a_capacity_without_backlogs_from_an_older_node_is_accepted() -> None:
    msg = decode(pack(CAPACITY))
    assert isinstance(msg, Capacity) and msg.backlog_s == {} and msg.busy == ()


def test_an_inventory_from_a_node_that_trains_nothing_offers_nothing_to_train() -> None:
    msg = decode(pack(INVENTORY))
    assert isinstance(msg, Inventory) and msg.models[0].trainable is False
    assert msg.models[0].tools is False  # nor is it taken to parse tool calls


def test_a_job_changed_frame_names_a_printable_bounded_id() -> None:
    for bad in ("x" * 200, "job\n1", 7):
        with pytest.raises(LinkProtocolError, match=r"job_changed\.job_id"):
            decode(pack({"v": 1, "type": "job_changed", "job_id": bad}))


def test_encode_refuses_a_frame_over_the_limit() -> None:
    huge = Inventory(tuple(ModelOffer(f"model-{i:05d}-" + "x" * 200, 4096) for i in range(400)))
    with pytest.raises(ValueError, match="exceeds"):
        encode(huge)


def _reject(frame: bytes, reason: str, code: int = CLOSE_UNSUPPORTED) -> None:
    with pytest.raises(LinkProtocolError, match=reason) as caught:
        decode(frame)
    assert caught.value.close_code == code
    assert isinstance(caught.value, LinkError) and caught.value.reason


def test_oversized_frame_is_refused_before_parsing() -> None:
    _reject(b"\x00" * (MAX_FRAME_BYTES + 1), "exceeds", CLOSE_TOO_BIG)
    with pytest.raises(LinkProtocolError, match="exceeds"):
        decode(pack(HELLO), max_bytes=10)


@pytest.mark.parametrize(("frame", "reason"), [
    (b"", "not msgpack"),
    (b"\xc1", "not msgpack"),  # the one byte msgpack never uses
    (b"\x92\x01", "not msgpack"),  # truncated array
    (pack(HELLO) + b"\x00", "not msgpack"),  # trailing bytes
    (b"\xa2\xff\xfe", "not msgpack"),  # a str that is not UTF-8
    (pack({1: "x"}), "not msgpack"),  # non-string map key
    (b"\x91" * 5000, "not msgpack"),  # nesting deeper than the unpacker's stack
    (pack([1, 2]), "not a map"),
    (pack("hello"), "not a map"),
])
def test_garbage_is_refused(frame: bytes, reason: str) -> None:
    _reject(frame, reason)


@pytest.mark.parametrize(("body", "reason"), [
    ({"type": "ping", "t": 1.0}, "field v"),
    ({**PING, "v": "1"}, "field v"),
    ({**PING, "v": True}, "field v"),
    ({**PING, "v": 2}, "unknown schema version 2"),
    ({"v": 1, "t": 1.0}, "field type"),
    ({**PING, "type": b"ping"}, "field type"),
    ({**PING, "type": "job"}, "unknown message type 'job'"),
    ({**PING, "extra": 1}, "unknown field 'extra'"),
    ({"v": 1, "type": "ping"}, r"ping\.t: missing"),
    ({**PING, "t": "now"}, r"ping\.t: expected a number, got str"),
    ({**PING, "t": True}, r"ping\.t: expected a number, got bool"),
    ({**PING, "t": float("nan")}, "not finite"),
    ({**PING, "t": float("inf")}, "not finite"),
    ({**PONG, "echo": None}, r"pong\.echo: expected a number"),
    ({**HELLO, "node_id": 5}, r"hello\.node_id: expected a string, got int"),
    ({**HELLO, "node_id": ""}, r"hello\.node_id: length 0"),
    ({**HELLO, "node_id": "x" * 129}, r"hello\.node_id: length 129"),
    ({**HELLO, "name": "a\nb"}, "control characters"),
    ({**HELLO, "role": b"spark"}, r"hello\.role: expected a string, got bytes"),
    ({**HELLO, "hardware": ""}, r"hello\.hardware: length 0"),
    ({**HELLO, "hardware": 1}, r"hello\.hardware: expected a string"),
    ({**HELLO, "protocols": 1}, r"hello\.protocols: expected an array"),
    ({**HELLO, "protocols": []}, r"hello\.protocols: empty"),
    # The path names the item's index (it said protocols[]): the one validator keeps every array item's path.
    ({**HELLO, "protocols": ["1"]}, r"hello\.protocols\[0\]: expected an int"),
    ({**HELLO, "protocols": [2, 0]}, r"hello\.protocols\[1\]: 0 outside"),
    ({**HELLO, "protocols": list(range(1, 30))}, "entries exceed"),
    ({**INVENTORY, "models": {}}, r"inventory\.models: expected an array"),
    ({**INVENTORY, "models": ["m"]}, r"inventory\.models\[0\]: expected a map"),
    ({**INVENTORY, "models": [{"id": "m", "max_ctx": 0, "loaded_ctx": None}]}, r"max_ctx: 0 outside"),
    ({**INVENTORY, "models": [{"id": "m", "max_ctx": 1.5, "loaded_ctx": None}]}, r"max_ctx: expected an int"),
    ({**INVENTORY, "models": [{"id": "m", "max_ctx": 8}]}, r"loaded_ctx: missing"),
    ({**INVENTORY, "models": [{"id": "m", "max_ctx": 8, "loaded_ctx": -1}]}, r"loaded_ctx: -1 outside"),
    ({**INVENTORY, "models": [{"id": "m", "max_ctx": 8, "loaded_ctx": None, "x": 1}]}, "unknown field 'x'"),
    ({**CAPACITY, "free_bytes": [1]}, r"capacity\.free_bytes: expected a map"),
    ({**CAPACITY, "free_bytes": {"gpu": -1}}, r"free_bytes\['gpu'\]: -1 outside"),
    ({**CAPACITY, "free_bytes": {"gpu": True}}, r"free_bytes\['gpu'\]: expected an int, got bool"),
    ({**CAPACITY, "free_bytes": {b"gpu": 1}}, r"free_bytes key: expected a string"),
    ({**CAPACITY, "free_bytes": {f"d{i}": 1 for i in range(65)}}, "65 entries exceed 64"),
    ({**CAPACITY, "queue_depth": -1}, r"queue_depth: -1 outside"),
    ({**CAPACITY, "decode_tok_s": {"m": -2.0}}, "negative"),
    ({**CAPACITY, "decode_tok_s": {"m": "fast"}}, "expected a number"),
    ({**CAPACITY, "backlog_s": {"m": -1.0}}, r"backlog_s\['m'\]: negative"),
    ({**CAPACITY, "backlog_s": {"m": float("inf")}}, "not finite"),
    ({**CAPACITY, "busy": {}}, r"capacity\.busy: expected an array"),
    ({**CAPACITY, "busy": [1]}, r"capacity\.busy\[0\]: expected a map"),
    ({**CAPACITY, "busy": [{"backlog_s": -3, "held": {}}]}, r"busy\[0\]\.backlog_s: negative"),
    ({**CAPACITY, "busy": [{"backlog_s": 3}]}, r"busy\[0\]\.held: missing"),
    ({**CAPACITY, "busy": [{"backlog_s": 3, "held": {"gb10": -1}}]}, r"held\['gb10'\]: -1 outside"),
    ({**CAPACITY, "busy": [{"backlog_s": 3, "held": {}, "x": 1}]}, "unknown field 'x'"),
])
def test_wrong_fields_are_refused(body: dict, reason: str) -> None:  # type: ignore[type-arg]
    _reject(pack(body), reason)


def test_msgpack_extension_types_are_refused() -> None:
    _reject(pack({**PING, "t": msgpack.ExtType(5, b"x")}), r"ping\.t: expected a number, got ExtType")
    _reject(pack({**PING, "t": msgpack.Timestamp(1, 0)}), r"ping\.t: expected a number, got Timestamp")


_leaves = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20) \
    | st.binary(max_size=20)
_values = st.recursive(_leaves, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_only_ever_raise_link_protocol_error(frame: bytes) -> None:
    with contextlib.suppress(LinkProtocolError):
        decode(frame)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([HELLO, INVENTORY, CAPACITY, PING, PONG]), st.text(max_size=12), _values)
def test_mutated_messages_only_ever_raise_link_protocol_error(base: dict, key: str, value: object) -> None:  # type: ignore[type-arg]
    body = {**base, key: value}
    with contextlib.suppress(LinkProtocolError):
        decode(pack(body))


def test_messages_module_is_pure() -> None:
    code = ("import sys, hybridd.peer.messages\n"
            "print(','.join(m for m in ('asyncio', 'aiohttp', 'zeroconf', 'socket', 'logging', 'ssl') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
