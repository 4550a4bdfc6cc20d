"""The control link's versioned message schema: frozen dataclasses <-> msgpack frames, validated strictly. Pure.

A frame is one msgpack map `{"v": 1, "type": <name>, <fields>...}`. Every field is required, has exactly one type and
a bound; an unknown key, version or type is rejected, because the bytes come from the LAN and `v` exists so that the
schema can grow by a version bump rather than by guesswork. Decoding never raises anything but LinkProtocolError.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from hybridd.peer.errors import LinkError
from hybridd.validate import MSGPACK, Reader, field_names

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
    # The NIC this link runs over, to wake the sender by Wake-on-LAN: its MAC and its subnet's IPv4 broadcast address
    # ("" = unknown: loopback, no IPv4, or a node that predates them).
    mac: str = ""
    broadcast: str = ""


@dataclass(frozen=True)
class ModelOffer:
    """One model a node can serve: the largest context it could run and the context of the loaded instance, if any."""

    id: str
    max_ctx: int
    loaded_ctx: int | None = None
    trainable: bool = False  # the node has the model's checkpoint: it can fine-tune it
    tools: bool = False  # its engine parses tool calls out of the model's output (tool_choice "auto")


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


@dataclass(frozen=True)
class JobChanged:
    """A fine-tuning job the receiver asked for changed on the sender (status, progress, events): fetch it."""

    job_id: str


Message = Hello | Inventory | Capacity | Ping | Pong | JobChanged

_TYPE_NAMES: dict[type, str] = {Hello: "hello", Inventory: "inventory", Capacity: "capacity", Ping: "ping",
                                Pong: "pong", JobChanged: "job_changed"}


def encode(msg: Message) -> bytes:
    """One msgpack frame for msg; raises ValueError if it would exceed MAX_FRAME_BYTES (our own mistake)."""
    body: dict[str, Any] = {"v": SCHEMA_VERSION, "type": _TYPE_NAMES[type(msg)]}
    if isinstance(msg, Hello):
        body.update(node_id=msg.node_id, name=msg.name, role=msg.role, version=msg.version,
                    protocols=list(msg.protocols))
        body.update({key: value for key, value in (("hardware", msg.hardware), ("mac", msg.mac),
                                                    ("broadcast", msg.broadcast)) if value})
    elif isinstance(msg, Inventory):
        body["models"] = [{"id": m.id, "max_ctx": m.max_ctx, "loaded_ctx": m.loaded_ctx,
                           **({"trainable": True} if m.trainable else {}), **({"tools": True} if m.tools else {})}
                          for m in msg.models]
    elif isinstance(msg, Capacity):
        body.update(free_bytes=dict(msg.free_bytes), queue_depth=msg.queue_depth,
                    decode_tok_s={k: float(v) for k, v in msg.decode_tok_s.items()},
                    backlog_s={k: float(v) for k, v in msg.backlog_s.items()},
                    busy=[{"backlog_s": float(b.backlog_s), "held": dict(b.held)} for b in msg.busy])
    elif isinstance(msg, Ping):
        body["t"] = float(msg.t)
    elif isinstance(msg, JobChanged):
        body["job_id"] = msg.job_id
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
        raise LinkProtocolError(f"frame is a {type(body).__name__}, not a map")
    version = body.get("v")
    if type(version) is not int:
        raise LinkProtocolError("field v: missing or not an int")
    if version != SCHEMA_VERSION:
        raise LinkProtocolError(f"unknown schema version {version} (supported: {SCHEMA_VERSION})")
    kind = body.get("type")
    if not isinstance(kind, str):
        raise LinkProtocolError("field type: missing or not a string")
    kind = Reader(kind, LinkProtocolError, MSGPACK).choice(sorted(_PARSERS), what="message type")
    message_class, parse = _PARSERS[kind]
    fields = {k: v for k, v in body.items() if k not in ("v", "type")}
    message: Message = parse(Reader(fields, LinkProtocolError, MSGPACK, path=kind).table(field_names(message_class)))
    return message


def _non_negative(reader: Reader) -> float:
    value = reader.number()
    if value < 0:
        raise reader.fail("negative")
    return value


def _bytes_per_device(reader: Reader) -> dict[str, int]:
    return {name: value.integer(low=0, high=MAX_BYTES)
            for name, value in reader.entries(max_items=MAX_DEVICES, max_key_chars=MAX_ID_CHARS).items()}


def _parse_hello(f: Reader) -> Hello:
    node_id = f.at("node_id").text(max_chars=MAX_ID_CHARS, printable=True)
    name = f.at("name").text(max_chars=MAX_TEXT_CHARS, printable=True)
    role = f.at("role").text(max_chars=MAX_ID_CHARS, printable=True)
    version = f.at("version").text(max_chars=MAX_ID_CHARS, printable=True)
    raw = f.at("protocols").items(max_items=MAX_PROTOCOLS)
    if not raw:
        raise f.at("protocols").fail("empty")
    protocols = tuple(p.integer(low=1, high=1 << 16) for p in raw)
    # Optional, so a node that predates it still says hello.
    hardware = f.at("hardware").text("", max_chars=MAX_ID_CHARS, printable=True)
    return Hello(node_id, name, role, version, protocols, hardware, f.at("mac").mac(""), f.at("broadcast").ipv4(""))


def _parse_inventory(f: Reader) -> Inventory:
    models = []
    for item in f.at("models").items(max_items=MAX_MODELS):
        entry = item.table(field_names(ModelOffer))
        model_id = entry.at("id").text(max_chars=MAX_TEXT_CHARS, printable=True)
        max_ctx = entry.at("max_ctx").integer(low=1, high=MAX_CTX)
        loaded = entry.at("loaded_ctx")  # required, but may be null
        loaded_ctx = None if loaded.value is None else loaded.integer(low=1, high=MAX_CTX)
        trainable = entry.at("trainable").of(bool, False)  # optional: a node that predates it trains nothing
        tools = entry.at("tools").of(bool, False)  # optional: a node that predates it is not taken to parse them
        models.append(ModelOffer(model_id, max_ctx, loaded_ctx, trainable, tools))
    return Inventory(tuple(models))


def _parse_capacity(f: Reader) -> Capacity:
    free = _bytes_per_device(f.at("free_bytes"))
    queue_depth = f.at("queue_depth").integer(low=0, high=1 << 31)
    rates = _non_negative_per_model(f.at("decode_tok_s"), optional=False)
    # Optional, so a node that predates them still reports its capacity.
    backlog = _non_negative_per_model(f.at("backlog_s"), optional=True)
    busy = []
    for item in f.at("busy").items(optional=True, max_items=MAX_MODELS):
        entry = item.table(field_names(Busy))
        busy.append(Busy(_non_negative(entry.at("backlog_s")), _bytes_per_device(entry.at("held"))))
    return Capacity(free, queue_depth, rates, backlog, tuple(busy))


def _non_negative_per_model(reader: Reader, optional: bool) -> dict[str, float]:
    entries = reader.entries(optional=optional, max_items=MAX_MODELS, max_key_chars=MAX_TEXT_CHARS)
    return {model_id: _non_negative(value) for model_id, value in entries.items()}


def _parse_ping(f: Reader) -> Ping:
    return Ping(f.at("t").number())


def _parse_pong(f: Reader) -> Pong:
    return Pong(f.at("t").number(), f.at("echo").number())


def _parse_job_changed(f: Reader) -> JobChanged:
    return JobChanged(f.at("job_id").text(max_chars=MAX_ID_CHARS, printable=True))


_PARSERS: dict[str, tuple[type, Callable[[Reader], Message]]] = {
    "hello": (Hello, _parse_hello), "inventory": (Inventory, _parse_inventory), "capacity": (Capacity, _parse_capacity),
    "ping": (Ping, _parse_ping), "pong": (Pong, _parse_pong), "job_changed": (JobChanged, _parse_job_changed),
}
