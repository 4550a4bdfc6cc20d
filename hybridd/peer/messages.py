"""The control link's versioned message schema: frozen dataclasses <-> msgpack frames, validated strictly. Pure.

A frame is one msgpack map `{"v": 1, "type": <name>, <fields>...}`. Every field is required, has exactly one type and
a bound; an unknown key, version or type is rejected, because the bytes come from the LAN and `v` exists so that the
schema can grow by a version bump rather than by guesswork. Decoding never raises anything but LinkProtocolError.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from hybridd.peer.errors import LinkError

SCHEMA_VERSION = 1
PROTOCOL_VERSIONS: tuple[int, ...] = (1,)  # link protocols this build speaks, offered in hello
MAX_FRAME_BYTES = 65536
CLOSE_UNSUPPORTED = 1003  # WebSocket close code: data we cannot accept
CLOSE_TOO_BIG = 1009  # WebSocket close code: message too big

MAX_ID_CHARS = 128
MAX_TEXT_CHARS = 256
MAX_MODELS = 512
MAX_DEVICES = 64
MAX_PROTOCOLS = 16
MAX_CTX = 1 << 31
MAX_BYTES = 1 << 60


class LinkProtocolError(LinkError):
    """The peer sent a frame we refuse: `reason` is one line for the log, `close_code` the WebSocket close code."""

    code = "link_protocol_error"

    def __init__(self, reason: str, close_code: int = CLOSE_UNSUPPORTED) -> None:
        super().__init__(reason)
        self.reason = reason
        self.close_code = close_code


@dataclass(frozen=True)
class Hello:
    """First frame on a link: who the sender is and which link protocols it speaks."""

    node_id: str
    name: str
    role: str
    version: str
    protocols: tuple[int, ...] = PROTOCOL_VERSIONS
    hardware: str = ""  # the hardware profile the receiver predicts this node's speed from ("" = unknown)


@dataclass(frozen=True)
class ModelOffer:
    """One model a node can serve: the largest context it could run and the context of the loaded instance, if any."""

    id: str
    max_ctx: int
    loaded_ctx: int | None = None


@dataclass(frozen=True)
class Inventory:
    """The models a node can serve; sent after hello and whenever the set changes."""

    models: tuple[ModelOffer, ...] = ()


@dataclass(frozen=True)
class Busy:
    """A busy engine of the sender: predicted seconds until its admitted work is done, bytes it holds per device."""

    backlog_s: float
    held: dict[str, int]


@dataclass(frozen=True)
class Capacity:
    """A node's load now: free bytes per device name (idle engines count as free: the node evicts them for a new
    load), queued requests, recent decode tok/s per model id, seconds of work ahead of a new request on each
    loaded model's engine, and its busy engines (what a new load could wait for)."""

    free_bytes: dict[str, int] = field(default_factory=dict)
    queue_depth: int = 0
    decode_tok_s: dict[str, float] = field(default_factory=dict)
    backlog_s: dict[str, float] = field(default_factory=dict)
    busy: tuple[Busy, ...] = ()


@dataclass(frozen=True)
class Ping:
    """Liveness and RTT probe; t is the sender's clock in seconds."""

    t: float


@dataclass(frozen=True)
class Pong:
    """Answer to a ping: t is the answerer's clock, echo the ping's t, so the pinger's RTT is now - echo."""

    t: float
    echo: float


Message = Hello | Inventory | Capacity | Ping | Pong

_TYPE_NAMES: dict[type, str] = {Hello: "hello", Inventory: "inventory", Capacity: "capacity", Ping: "ping",
                                Pong: "pong"}


def encode(msg: Message) -> bytes:
    """One msgpack frame for msg; raises ValueError if it would exceed MAX_FRAME_BYTES (our own mistake)."""
    body: dict[str, Any] = {"v": SCHEMA_VERSION, "type": _TYPE_NAMES[type(msg)]}
    if isinstance(msg, Hello):
        body.update(node_id=msg.node_id, name=msg.name, role=msg.role, version=msg.version,
                    protocols=list(msg.protocols))
        if msg.hardware:
            body["hardware"] = msg.hardware
    elif isinstance(msg, Inventory):
        body["models"] = [{"id": m.id, "max_ctx": m.max_ctx, "loaded_ctx": m.loaded_ctx} for m in msg.models]
    elif isinstance(msg, Capacity):
        body.update(free_bytes=dict(msg.free_bytes), queue_depth=msg.queue_depth,
                    decode_tok_s={k: float(v) for k, v in msg.decode_tok_s.items()},
                    backlog_s={k: float(v) for k, v in msg.backlog_s.items()},
                    busy=[{"backlog_s": float(b.backlog_s), "held": dict(b.held)} for b in msg.busy])
    elif isinstance(msg, Ping):
        body["t"] = float(msg.t)
    else:
        body.update(t=float(msg.t), echo=float(msg.echo))
    frame: bytes = msgpack.packb(body, use_bin_type=True)
    if len(frame) > MAX_FRAME_BYTES:
        raise ValueError(f"{body['type']} frame of {len(frame)} bytes exceeds {MAX_FRAME_BYTES}")
    return frame


def decode(frame: bytes, max_bytes: int = MAX_FRAME_BYTES) -> Message:
    """The message in one frame; raises LinkProtocolError naming what is wrong with it."""
    if len(frame) > max_bytes:
        raise LinkProtocolError(f"frame of {len(frame)} bytes exceeds {max_bytes}", CLOSE_TOO_BIG)
    try:
        # Lengths are bounded by the frame size already; strict_map_key keeps keys to str/bytes.
        body = msgpack.unpackb(frame, raw=False, strict_map_key=True, use_list=True)
    except (ValueError, msgpack.UnpackException) as exc:  # ExtraData, StackError, bad UTF-8... all land here
        raise LinkProtocolError(f"not msgpack: {type(exc).__name__}") from exc
    if not isinstance(body, dict):
        raise LinkProtocolError(f"frame is a {_kind(body)}, not a map")
    version = body.get("v")
    if type(version) is not int:
        raise LinkProtocolError("field v: missing or not an int")
    if version != SCHEMA_VERSION:
        raise LinkProtocolError(f"unknown schema version {version} (supported: {SCHEMA_VERSION})")
    kind = body.get("type")
    if not isinstance(kind, str):
        raise LinkProtocolError("field type: missing or not a string")
    parse = _PARSERS.get(kind)
    if parse is None:
        raise LinkProtocolError(f"unknown message type {kind[:32]!r} (valid: {', '.join(sorted(_PARSERS))})")
    fields = {k: v for k, v in body.items() if k not in ("v", "type")}
    message: Message = parse(_Fields(kind, fields))
    return message


class _Fields:
    """Typed, bounded access to one message's fields; every key must be read exactly once."""

    def __init__(self, kind: str, body: dict[Any, Any]) -> None:
        self.kind = kind
        self.body = body
        self.read: set[str] = set()

    def raw(self, key: str) -> Any:
        if key not in self.body:
            raise LinkProtocolError(f"{self.kind}.{key}: missing")
        self.read.add(key)
        return self.body[key]

    def done(self) -> None:
        extra = [k for k in self.body if k not in self.read]
        if extra:
            raise LinkProtocolError(f"{self.kind}: unknown field {str(extra[0])[:32]!r}")

    def text(self, key: str, limit: int = MAX_TEXT_CHARS) -> str:
        return _text(self.raw(key), f"{self.kind}.{key}", limit)

    def integer(self, key: str, low: int, high: int) -> int:
        return _integer(self.raw(key), f"{self.kind}.{key}", low, high)

    def number(self, key: str) -> float:
        return _number(self.raw(key), f"{self.kind}.{key}")

    def array(self, key: str, limit: int) -> list[Any]:
        value = self.raw(key)
        if not isinstance(value, list):
            raise LinkProtocolError(f"{self.kind}.{key}: expected an array, got {_kind(value)}")
        if len(value) > limit:
            raise LinkProtocolError(f"{self.kind}.{key}: {len(value)} entries exceed {limit}")
        return value

    def mapping(self, key: str, limit: int, key_limit: int) -> dict[str, Any]:
        value = self.raw(key)
        if not isinstance(value, dict):
            raise LinkProtocolError(f"{self.kind}.{key}: expected a map, got {_kind(value)}")
        if len(value) > limit:
            raise LinkProtocolError(f"{self.kind}.{key}: {len(value)} entries exceed {limit}")
        for name in value:
            _text(name, f"{self.kind}.{key} key", key_limit)
        return value


def _kind(value: object) -> str:
    return type(value).__name__


def _text(value: object, where: str, limit: int) -> str:
    if not isinstance(value, str):
        raise LinkProtocolError(f"{where}: expected a string, got {_kind(value)}")
    if not value or len(value) > limit:
        raise LinkProtocolError(f"{where}: length {len(value)} outside 1..{limit}")
    if not value.isprintable():
        raise LinkProtocolError(f"{where}: contains control characters")
    return value


def _integer(value: object, where: str, low: int, high: int) -> int:
    if type(value) is not int:  # bool is an int subclass; a peer sending true for a count is broken
        raise LinkProtocolError(f"{where}: expected an int, got {_kind(value)}")
    if not low <= value <= high:
        raise LinkProtocolError(f"{where}: {value} outside {low}..{high}")
    return value


def _number(value: object, where: str) -> float:
    if type(value) not in (int, float):
        raise LinkProtocolError(f"{where}: expected a number, got {_kind(value)}")
    number = float(value)  # type: ignore[arg-type]
    if not math.isfinite(number):
        raise LinkProtocolError(f"{where}: not finite")
    return number


def _parse_hello(f: _Fields) -> Hello:
    node_id = f.text("node_id", MAX_ID_CHARS)
    name, role, version = f.text("name"), f.text("role", MAX_ID_CHARS), f.text("version", MAX_ID_CHARS)
    raw = f.array("protocols", MAX_PROTOCOLS)
    if not raw:
        raise LinkProtocolError("hello.protocols: empty")
    protocols = tuple(_integer(p, "hello.protocols[]", 1, 1 << 16) for p in raw)
    # Optional, so a node that predates it still says hello.
    hardware = f.text("hardware", MAX_ID_CHARS) if "hardware" in f.body else ""
    f.done()
    return Hello(node_id, name, role, version, protocols, hardware)


def _parse_inventory(f: _Fields) -> Inventory:
    models = []
    for index, raw in enumerate(f.array("models", MAX_MODELS)):
        where = f"inventory.models[{index}]"
        if not isinstance(raw, dict):
            raise LinkProtocolError(f"{where}: expected a map, got {_kind(raw)}")
        entry = _Fields(where, raw)
        model_id = entry.text("id", MAX_TEXT_CHARS)
        max_ctx = entry.integer("max_ctx", 1, MAX_CTX)
        loaded = entry.raw("loaded_ctx")
        loaded_ctx = None if loaded is None else _integer(loaded, f"{where}.loaded_ctx", 1, MAX_CTX)
        entry.done()
        models.append(ModelOffer(model_id, max_ctx, loaded_ctx))
    f.done()
    return Inventory(tuple(models))


def _parse_capacity(f: _Fields) -> Capacity:
    free = {name: _integer(v, f"capacity.free_bytes[{name!r}]", 0, MAX_BYTES)
            for name, v in f.mapping("free_bytes", MAX_DEVICES, MAX_ID_CHARS).items()}
    queue_depth = f.integer("queue_depth", 0, 1 << 31)
    rates = _non_negative_per_model(f, "decode_tok_s")
    # Optional, so a node that predates them still reports its capacity.
    backlog = _non_negative_per_model(f, "backlog_s") if "backlog_s" in f.body else {}
    busy = []
    for index, raw in enumerate(f.array("busy", MAX_MODELS) if "busy" in f.body else []):
        where = f"capacity.busy[{index}]"
        if not isinstance(raw, dict):
            raise LinkProtocolError(f"{where}: expected a map, got {_kind(raw)}")
        entry = _Fields(where, raw)
        seconds = _non_negative(entry.number("backlog_s"), f"{where}.backlog_s")
        held = {name: _integer(v, f"{where}.held[{name!r}]", 0, MAX_BYTES)
                for name, v in entry.mapping("held", MAX_DEVICES, MAX_ID_CHARS).items()}
        entry.done()
        busy.append(Busy(seconds, held))
    f.done()
    return Capacity(free, queue_depth, rates, backlog, tuple(busy))


def _non_negative(value: float, where: str) -> float:
    if value < 0:
        raise LinkProtocolError(f"{where}: negative")
    return value


def _non_negative_per_model(f: _Fields, key: str) -> dict[str, float]:
    return {model_id: _non_negative(_number(value, f"capacity.{key}[{model_id!r}]"), f"capacity.{key}[{model_id!r}]")
            for model_id, value in f.mapping(key, MAX_MODELS, MAX_TEXT_CHARS).items()}


def _parse_ping(f: _Fields) -> Ping:
    t = f.number("t")
    f.done()
    return Ping(t)


def _parse_pong(f: _Fields) -> Pong:
    t, echo = f.number("t"), f.number("echo")
    f.done()
    return Pong(t, echo)


_PARSERS: dict[str, Callable[[_Fields], Message]] = {
    "hello": _parse_hello, "inventory": _parse_inventory, "capacity": _parse_capacity, "ping": _parse_ping,
    "pong": _parse_pong,
}
