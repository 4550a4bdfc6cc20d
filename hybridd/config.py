"""Config: TOML text to a typed, validated Config. Pure: reading the file is the caller's business.

Every error is one line that names the dotted key and, where there is a fixed set, the valid choices:
    models[1].type_v: unknown cache type "q9" (valid: bf16, f16, f32, iq4_nl, q4_0, q4_1, q5_0, q5_1, q8_0)
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hybridd.errors import ConfigError
from hybridd.validate import Reader, field_names, quoted

DEFAULT_PORT = 11435
ENGINE_KINDS = ("llama-cpp-python", "llama-server", "external", "peer-only")
MANAGED_KINDS = ENGINE_KINDS[:2]  # hybridd runs the engine process itself
# ggml type ids as llama.cpp numbers them (ggml.h enum ggml_type); llama_cpp.server takes the id.
KV_CACHE_TYPES = {
    "f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "iq4_nl": 20, "bf16": 30,
}
UNQUANTIZED_KV = ("f32", "f16", "bf16")
LOG_LEVELS = ("debug", "info", "warning", "error")
ROLES = ("desktop", "peer")
DEFAULT_LAN_PORT = 11436
REPACK_CHOICES = ("auto", "on", "off")
MAX_NAME_CHARS = 63  # node.name becomes an mDNS label


@dataclass(frozen=True)
class ServerConfig:
    """The HTTP listener and its guards."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    allow_non_loopback: bool = False
    extra_hosts: tuple[str, ...] = ()
    max_body_bytes: int = 16 * 1024 * 1024
    shutdown_grace_s: float = 30.0
    log_level: str = "info"
    lan_listen: str = ""  # host:port of the mutual-TLS listener for paired nodes; "" = none (peer default: all:11436)
    metrics_listen: str = ""  # host:port serving GET /metrics alone (a Prometheus on another machine); "" = none

    @property
    def listen(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


DEFAULT_LISTEN = ServerConfig().listen


@dataclass(frozen=True)
class EngineDefaults:
    """Settings every model inherits unless its own entry overrides them."""

    kind: str = "llama-cpp-python"
    # kind not named (or "auto"): `hybridd serve` chooses, llama-server where one is built (with_default_engine);
    # until then the models it implies run on llama-cpp-python, the engine that needs no build step.
    auto: bool = True
    python: str = ""
    llama_server: str = ""  # the llama-server binary; "" = PATH, else `hybridd engines build`'s cache
    load_timeout_s: float = 180.0
    idle_ttl_s: float = 900.0
    ctx: int = 8192
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: bool = False
    n_gpu_layers: int = -1
    repack: str = "auto"
    options: Mapping[str, Any] = field(default_factory=dict)

    def entry(self, name: str, path: Path, **overrides: Any) -> ModelEntry:
        """A model entry for path that takes every setting from these defaults (overrides win)."""
        settings = {key: getattr(self, key) for key in _INHERITED}
        settings.update(engine=self.kind, engine_implied=True, options=dict(self.options))
        return ModelEntry(name=name, path=path, **{**settings, **overrides})


@dataclass(frozen=True)
class ModelEntry:
    """One model hybridd serves: a local GGUF run by a managed engine, or an external OpenAI-compatible URL.

    The settings it shares with EngineDefaults default to [engine]'s defaults, stated there once.
    """

    name: str
    path: Path | None = None
    base_url: str | None = None
    api_key: str | None = None
    upstream_model: str | None = None
    profile: str | None = None
    quant: str | None = None
    aliases: tuple[str, ...] = ()
    engine: str = EngineDefaults.kind
    ctx: int = EngineDefaults.ctx
    type_k: str = EngineDefaults.type_k
    type_v: str = EngineDefaults.type_v
    flash_attn: bool = EngineDefaults.flash_attn
    n_gpu_layers: int = EngineDefaults.n_gpu_layers
    idle_ttl_s: float = EngineDefaults.idle_ttl_s
    load_timeout_s: float = EngineDefaults.load_timeout_s
    repack: str = EngineDefaults.repack
    # Off by default: with embeddings on, llama.cpp outputs an embedding for every token, slowing generation.
    embeddings: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    slots: int = 1  # llama-server: requests it runs at once (the context is divided among them)
    train_path: Path | None = None  # the Hugging Face checkpoint folder a fine-tune of this model trains from
    lora_path: Path | None = None  # a llama.cpp LoRA GGUF applied over `path` (a fine-tuned model)
    # llama-server: LoRA GGUFs loaded with the model and applied per request (fine-tunes of this base, registered
    # by their jobs); and on a fine-tune's own entry, the base whose engine serves it with its lora_path.
    adapters: tuple[Path, ...] = ()
    adapter_of: str | None = None
    engine_implied: bool = False  # its engine is [engine]'s kind, not named by its own entry


    @property
    def managed(self) -> bool:
        """True when hybridd runs the engine process itself."""
        return self.engine in MANAGED_KINDS

    @property
    def outputs_every_row(self) -> bool:
        """Whether its engine reserves logits for more rows than one a slot (memory.engine_outputs): embeddings, a
        pooling type, or speculative decoding passed through `options` (sized at n_batch, the most it takes)."""
        return self.embeddings or any({"pooling", "draft", "spec"} & set(key.split("_")) for key in self.options)

    @property
    def parses_tools(self) -> bool:
        """Whether its engine returns the tool calls a model makes unforced (tool_choice "auto") as tool calls:
        llama-server (--jinja) does, an external server is taken to, llama-cpp-python returns them as text."""
        return self.engine != "llama-cpp-python"

    @property
    def local(self) -> bool:
        """True when this node can serve the model itself (a GGUF here or an external URL)."""
        return self.engine != "peer-only"


# The settings a model inherits from [engine]: ctx, cache types, flash attention, layers, timeouts, repack, options.
_INHERITED = tuple(name for name in field_names(EngineDefaults) if name in field_names(ModelEntry))


@dataclass(frozen=True)
class BudgetDevice:
    """A device given by config instead of probed: a memory budget hybridd may fill (tests, or a cap)."""

    name: str
    memory_bytes: int
    bandwidth_bytes_s: float = 1.0e12
    unified: bool = False
    compute_capability: int = 0  # major x 10 + minor: with sm_count, picks llama.cpp's attention kernel
    sm_count: int = 0


@dataclass(frozen=True)
class NodeConfig:
    """This node's identity and the resources placement may count on."""

    name: str = ""
    role: str = "desktop"
    hardware: str = ""
    devices: tuple[BudgetDevice, ...] = ()
    ram_bytes: int | None = None
    ram_bandwidth_bytes_s: float = 60e9
    disk_read_bytes_s: float = 2e9
    display_reserve_bytes: int = 1024**3
    queue_limit: int = 16
    default_max_tokens: int = 2048
    peer_first_byte_timeout_s: float = 600.0  # a peer may load a 60 GB model before its first byte
    peer_idle_timeout_s: float = 60.0  # between two chunks of a peer's stream
    # A local engine's first byte may take its predicted queue wait and prefill (and decode, unstreamed) four times
    # over, never less than this: predictions can be far off on a CPU before they are calibrated.
    engine_first_byte_floor_s: float = 120.0
    engine_idle_timeout_s: float = 60.0  # between two chunks of a local engine's stream
    engine_health_interval_s: float = 10.0  # a live engine missing 3 health checks in a row is hung: restarted
    advertise: bool | None = None  # announce this node on mDNS; None: by role (see `advertised`)
    advertise_interfaces: tuple[str, ...] = ()  # interface names or addresses mDNS runs on; () = all
    # Wake-on-LAN: how long a sleeping peer takes to wake and link up (counted in its predicted time), and how long
    # a request held for a woken peer waits for its link before it is refused.
    peer_wake_s: float = 60.0
    wake_timeout_s: float = 120.0

    @property
    def advertised(self) -> bool:
        """Whether this node announces itself on mDNS: node.advertise, else only a peer (a desktop dials its peers)."""
        return self.role == "peer" if self.advertise is None else self.advertise


@dataclass(frozen=True)
class PeerConfig:
    """A statically configured peer: an OpenAI-compatible URL with the hardware it runs on."""

    name: str
    base_url: str
    hardware: str
    models: tuple[str, ...] = ()
    api_key: str | None = None

    def serves(self, model: str) -> bool:
        """True if this peer serves model (an empty list means every model)."""
        return not self.models or model in self.models


@dataclass(frozen=True)
class WakeConfig:
    """How to wake a paired peer by Wake-on-LAN, where its link cannot tell (a NIC other than the link's) or to
    override what it told: its MAC and the broadcast address to send the magic packet to."""

    peer: str  # the paired peer's name
    mac: str
    broadcast: str = ""  # "" = the one the peer's link told, else 255.255.255.255


@dataclass(frozen=True)
class FilesConfig:
    """Uploaded files (datasets for fine-tuning), kept under the state dir."""

    max_bytes: int = 1024**3  # an upload's own cap; uploads stream to disk, so server.max_body_bytes is not theirs


@dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning jobs: the trainer they run and its defaults (see plugins/trainers.md)."""

    # The trainer's argv; "{python}" is the daemon's interpreter and "{spec}" the job's spec file. Empty: the
    # built-in trainer (hybridd/jobs/hf_trainer.py, the `train` extra).
    command: tuple[str, ...] = ()
    checkpoint_every: int = 50  # optimizer steps between checkpoints; a restart resumes from the last one
    cancel_grace_s: float = 10.0  # SIGTERM to the trainer's process group, then SIGKILL after this long
    max_seq: int = 2048  # training sequence length when a job does not say
    rank: int = 16  # LoRA rank when a job does not say
    max_running: int = 1  # jobs training on this node at once


@dataclass(frozen=True)
class Config:
    """The whole daemon config."""

    server: ServerConfig = ServerConfig()
    files: FilesConfig = FilesConfig()
    train: TrainConfig = TrainConfig()
    engine: EngineDefaults = EngineDefaults()
    node: NodeConfig = NodeConfig()
    peers: tuple[PeerConfig, ...] = ()
    wake: tuple[WakeConfig, ...] = ()
    models: tuple[ModelEntry, ...] = ()
    library_dirs: tuple[Path, ...] = ()
    state_dir: Path | None = None
    source: str = "<defaults>"


def config_path(env: Mapping[str, str] = os.environ) -> Path:
    """Where the config lives: $XDG_CONFIG_HOME/hybridd/config.toml."""
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME", "~")).expanduser() / ".config")
    return Path(base) / "hybridd" / "config.toml"


def state_dir(env: Mapping[str, str] = os.environ) -> Path:
    """Where state lives: $XDG_STATE_HOME/hybridd."""
    base = env.get("XDG_STATE_HOME") or str(Path(env.get("HOME", "~")).expanduser() / ".local" / "state")
    return Path(base) / "hybridd"


def parse_config(text: str, source: str = "<string>", base_dir: Path | None = None) -> Config:
    """Parse and validate config text; raise ConfigError naming the dotted key on any problem."""
    try:
        raw = tomllib.loads(text)
    except ValueError as exc:  # TOMLDecodeError, or an integer too long for Python to convert
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    return _config(raw, source, base_dir or Path.cwd())


def load_config(path: Path) -> Config:
    """Read and validate the config file at path."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); TOML files are UTF-8") from exc
    return parse_config(text, source=str(path), base_dir=path.parent)


def with_default_engine(config: Config, kind: str) -> Config:
    """The config with [engine] kind set to `kind`, and with it the engine of every model that names none."""
    if kind not in MANAGED_KINDS:
        raise ConfigError(f'{config.source}: engine.kind: unknown value {quoted(kind)} '
                          f'(valid: {", ".join(MANAGED_KINDS)})')
    models = tuple(replace(m, engine=kind) if m.engine_implied else m for m in config.models)
    return replace(config, engine=replace(config.engine, kind=kind, auto=False), models=models)


def with_role(config: Config, role: str) -> Config:
    """The config with node.role replaced (the --role flag wins over the file)."""
    if role not in ROLES:
        raise ConfigError(f'{config.source}: node.role: unknown value {quoted(role)} (valid: {", ".join(ROLES)})')
    return replace(config, node=replace(config.node, role=role))


def lan_listen(config: Config) -> tuple[str, int] | None:
    """Where the mutual-TLS listener for paired nodes binds: server.lan_listen, or all addresses:11436 on a peer."""
    if config.server.lan_listen:
        return parse_listen(config.server.lan_listen, "server.lan_listen", config.source)
    return ("0.0.0.0", DEFAULT_LAN_PORT) if config.node.role == "peer" else None


def with_listen(config: Config, listen: str) -> Config:
    """The config with the listen address replaced (a CLI flag wins over the file)."""
    host, port = parse_listen(listen, "server.listen", config.source)
    server = replace(config.server, host=host, port=port)
    _check_loopback(server, config.source)
    return replace(config, server=server)


def is_loopback_host(host: str) -> bool:
    """True for localhost names and loopback addresses."""
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_listen(value: str, key: str, source: str) -> tuple[str, int]:
    """Split 'host:port' (IPv6 in brackets); the port is required."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f'{source}: {key}: expected "host:port" (e.g. "{DEFAULT_LISTEN}"), got {quoted(value)}')
    return host.strip("[]"), int(port_text)


def _check_loopback(server: ServerConfig, source: str) -> None:
    if not is_loopback_host(server.host) and not server.allow_non_loopback:
        raise ConfigError(
            f'{source}: server.listen: "{server.listen}" is not a loopback address; the local API has no '
            "authentication, so set server.allow_non_loopback = true to expose it on purpose"
        )


def _config(raw: dict[str, Any], source: str, base_dir: Path) -> Config:
    doc = Reader(raw, ConfigError, prefix=f"{source}: ").table(
        ("server", "files", "train", "engine", "node", "peers", "wake", "models", "library", "state_dir"))
    server = _server(doc.at("server").table(_SERVER_KEYS, optional=True), source)
    files = doc.at("files").table(field_names(FilesConfig), optional=True)
    train = _train(doc.at("train").table(field_names(TrainConfig), optional=True))
    node = _node(doc.at("node").table(field_names(NodeConfig), optional=True))
    peer_items = doc.at("peers").items(optional=True)
    peers = tuple(_peer(item) for item in peer_items)
    names = [p.name for p in peers]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise peer_items[i].at("name").fail(f'"{name}" is already used by peers[{names.index(name)}]')
    wake_items = doc.at("wake").items(optional=True)
    wake = tuple(_wake(item) for item in wake_items)
    for i, entry in enumerate(wake):
        if entry.peer in [w.peer for w in wake[:i]]:
            raise wake_items[i].at("peer").fail(f'"{entry.peer}" already has a [[wake]] entry')
    engine = _engine(doc.at("engine").table(_ENGINE_KEYS, optional=True))
    library = doc.at("library").table(("dirs",), optional=True)
    dirs = [item.of(str) for item in library.at("dirs").items(optional=True)]
    model_items = doc.at("models").items(optional=True)
    models = tuple(_model(item, engine, base_dir) for item in model_items)
    _check_unique(models, model_items)
    state = doc.at("state_dir").of(str, None)
    return Config(
        server=server,
        files=FilesConfig(max_bytes=files.at("max_bytes").integer(FilesConfig.max_bytes, low=1)),
        train=train,
        engine=engine,
        node=node,
        peers=peers,
        wake=wake,
        models=models,
        library_dirs=tuple(_path(d, base_dir) for d in dirs),
        state_dir=_path(state, base_dir) if state else None,
        source=source,
    )


# `listen` stands for host and port.
_SERVER_KEYS = tuple(sorted({*field_names(ServerConfig)} - {"host", "port"} | {"listen"}))


def _server(table: Reader, source: str) -> ServerConfig:
    listen = table.at("listen")
    host, port = parse_listen(listen.of(str, DEFAULT_LISTEN), listen.path, source)
    max_body = table.at("max_body_bytes").integer(ServerConfig.max_body_bytes, low=1024)
    server = ServerConfig(
        host=host,
        port=port,
        allow_non_loopback=table.at("allow_non_loopback").of(bool, ServerConfig.allow_non_loopback),
        extra_hosts=tuple(item.of(str).lower() for item in table.at("extra_hosts").items(optional=True)),
        max_body_bytes=max_body,
        shutdown_grace_s=table.at("shutdown_grace_s").number(ServerConfig.shutdown_grace_s, above=0),
        log_level=table.at("log_level").choice(LOG_LEVELS, ServerConfig.log_level),
        lan_listen=table.at("lan_listen").of(str, ServerConfig.lan_listen),
        metrics_listen=table.at("metrics_listen").of(str, ServerConfig.metrics_listen),
    )
    if server.lan_listen:
        parse_listen(server.lan_listen, "server.lan_listen", source)
    if server.metrics_listen:
        parse_listen(server.metrics_listen, "server.metrics_listen", source)
    _check_loopback(server, source)
    return server


def _node(table: Reader) -> NodeConfig:
    devices = []
    for i, item in enumerate(table.at("devices").items(optional=True)):
        device = item.table(field_names(BudgetDevice))
        devices.append(BudgetDevice(
            name=device.at("name").of(str, f"budget{i}"),
            memory_bytes=device.at("memory_bytes").integer(above=0),
            bandwidth_bytes_s=device.at("bandwidth_bytes_s").number(BudgetDevice.bandwidth_bytes_s, above=0),
            unified=device.at("unified").of(bool, BudgetDevice.unified),
            compute_capability=device.at("compute_capability").integer(0, low=0, high=200),
            sm_count=device.at("sm_count").integer(0, low=0, high=10_000),
        ))

    def positive(name: str) -> float:
        return table.at(name).number(getattr(NodeConfig, name), above=0)

    name = table.at("name")
    return NodeConfig(
        # It goes into headers, logs, a certificate and an mDNS label: printable, and short enough for a label.
        name=name.text(max_chars=MAX_NAME_CHARS, printable=True) if name.of(str, "") else NodeConfig.name,
        role=table.at("role").choice(ROLES, NodeConfig.role),
        hardware=table.at("hardware").of(str, NodeConfig.hardware),
        devices=tuple(devices),
        ram_bytes=table.at("ram_bytes").integer(NodeConfig.ram_bytes, low=0),
        ram_bandwidth_bytes_s=positive("ram_bandwidth_bytes_s"),
        disk_read_bytes_s=positive("disk_read_bytes_s"),
        display_reserve_bytes=table.at("display_reserve_bytes").integer(NodeConfig.display_reserve_bytes, low=0),
        queue_limit=table.at("queue_limit").integer(NodeConfig.queue_limit, above=0),
        default_max_tokens=table.at("default_max_tokens").integer(NodeConfig.default_max_tokens, above=0),
        peer_first_byte_timeout_s=positive("peer_first_byte_timeout_s"),
        peer_idle_timeout_s=positive("peer_idle_timeout_s"),
        engine_first_byte_floor_s=positive("engine_first_byte_floor_s"),
        engine_idle_timeout_s=positive("engine_idle_timeout_s"),
        engine_health_interval_s=positive("engine_health_interval_s"),
        advertise=table.at("advertise").of(bool, NodeConfig.advertise),
        advertise_interfaces=tuple(_interface(item) for item in table.at("advertise_interfaces").items(optional=True)),
        peer_wake_s=table.at("peer_wake_s").number(NodeConfig.peer_wake_s, low=0),
        wake_timeout_s=positive("wake_timeout_s"),
    )


def _wake(item: Reader) -> WakeConfig:
    table = item.table(field_names(WakeConfig))
    peer = table.at("peer").text(max_chars=MAX_NAME_CHARS + 1, printable=True)
    return WakeConfig(peer=peer, mac=table.at("mac").mac(), broadcast=table.at("broadcast").ipv4(""))


_INTERFACE_NAME = re.compile(r"[A-Za-z0-9_.:@-]{1,15}")  # Linux: IFNAMSIZ less its NUL, no '/' or blanks


def _interface(item: Reader) -> str:
    """An interface to run mDNS on: its name (e.g. "eth0") or one of its IP addresses."""
    value = item.text()
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        if not _INTERFACE_NAME.fullmatch(value):
            raise item.fail(f'{quoted(value)} is neither an interface name (e.g. "eth0") nor an IP address') from None
    return value


def _peer(item: Reader) -> PeerConfig:
    table = item.table(field_names(PeerConfig))
    name = table.at("name").of(str, None)
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise table.at("name").fail("required: letters, digits, '-', '_' or '.' (it appears in headers)")
    base_url = table.at("base_url").of(str, None)
    if not base_url or not base_url.startswith(("http://", "https://")):
        raise table.at("base_url").fail('required: the peer\'s OpenAI URL, e.g. "http://spark.local:11435"')
    hardware = table.at("hardware").of(str, None)
    if not hardware:
        raise table.at("hardware").fail('required: a hardware profile name, e.g. "dgx-spark"')
    models = tuple(model.of(str) for model in table.at("models").items(optional=True))
    return PeerConfig(name=name, base_url=base_url.rstrip("/").removesuffix("/v1"), hardware=hardware,
                      models=models, api_key=table.at("api_key").of(str, PeerConfig.api_key))


def _train(table: Reader) -> TrainConfig:
    command = tuple(item.text() for item in table.at("command").items(optional=True))
    if command and not any("{spec}" in part for part in command):
        raise table.at("command").fail('the trainer command must pass the job\'s spec file: put "{spec}" in it')
    return TrainConfig(
        command=command,
        checkpoint_every=table.at("checkpoint_every").integer(TrainConfig.checkpoint_every, low=1),
        cancel_grace_s=table.at("cancel_grace_s").number(TrainConfig.cancel_grace_s, above=0),
        max_seq=table.at("max_seq").integer(TrainConfig.max_seq, low=16, high=1 << 20),
        rank=table.at("rank").integer(TrainConfig.rank, low=1, high=4096),
        max_running=table.at("max_running").integer(TrainConfig.max_running, low=1, high=64),
    )


def _engine(table: Reader) -> EngineDefaults:
    base = EngineDefaults()
    kind = table.at("kind").choice(("auto", *MANAGED_KINDS), "auto")
    return EngineDefaults(
        kind=base.kind if kind == "auto" else kind,
        auto=kind == "auto",
        python=table.at("python").of(str, base.python),
        llama_server=table.at("llama_server").of(str, base.llama_server),
        **_inherited(table, base),
    )


# Set by the fine-tuning registry, not by a config file.
_MODEL_KEYS = tuple(name for name in field_names(ModelEntry) if name not in ("adapters", "adapter_of",
                                                                            "engine_implied"))
_ENGINE_KEYS = tuple(name for name in field_names(EngineDefaults) if name != "auto")  # kind = "auto" says it


def _model(item: Reader, defaults: EngineDefaults, base_dir: Path) -> ModelEntry:
    table = item.table(_MODEL_KEYS)
    name = table.at("name").of(str, None)
    if not name:
        raise table.at("name").fail("required: the model id clients ask for")
    aliases = tuple(alias.text() for alias in table.at("aliases").items(optional=True))
    path = table.at("path").of(str, None)
    base_url = table.at("base_url").of(str, None)
    profile = table.at("profile").of(str, None)
    implied = "external" if base_url else "peer-only" if profile and not path else defaults.kind
    engine = table.at("engine").choice(ENGINE_KINDS, implied)
    if engine == "peer-only":
        if not profile:
            raise table.at("profile").fail("a model served only by peers needs a model profile name")
    elif engine == "external":
        if not base_url or not base_url.startswith(("http://", "https://")):
            raise table.at("base_url").fail('an external model needs an http(s) URL, e.g. "http://127.0.0.1:8080"')
        if path:
            raise table.at("path").fail("an external model has a base_url, not a path")
    elif not path:
        raise table.at("path").fail("required: the GGUF file to serve (or set base_url for an external server)")
    if table.at("slots").present and engine != "llama-server" and table.at("slots").value != 1:
        raise table.at("slots").fail('parallel slots need engine = "llama-server" (llama-cpp-python runs one '
                                     "request at a time)")
    return ModelEntry(
        name=name,
        path=_path(path, base_dir) if path else None,
        base_url=base_url.rstrip("/") if base_url else None,
        api_key=table.at("api_key").of(str, None),
        upstream_model=table.at("upstream_model").of(str, None),
        profile=profile,
        quant=table.at("quant").of(str, None),
        aliases=aliases,
        engine=engine,
        engine_implied=not table.at("engine").present and engine == defaults.kind,
        embeddings=table.at("embeddings").of(bool, ModelEntry.embeddings),
        slots=table.at("slots").integer(ModelEntry.slots, low=1, high=256),
        train_path=_folder(table.at("train_path"), base_dir),
        lora_path=_path(lora, base_dir) if (lora := table.at("lora_path").of(str, None)) else None,
        **_inherited(table, defaults),
    )


def _folder(item: Reader, base_dir: Path) -> Path | None:
    """A Hugging Face checkpoint folder; not checked for existence here (a mount may come later): the job says."""
    value = item.of(str, None)
    return _path(value, base_dir) if value else None


def _inherited(table: Reader, defaults: EngineDefaults) -> dict[str, Any]:
    """The settings a model inherits from [engine], read from an [engine] or [[models]] table over `defaults`."""
    kv_types = tuple(sorted(KV_CACHE_TYPES))
    settings = {
        "ctx": table.at("ctx").integer(defaults.ctx, low=256, high=4 * 1024 * 1024),
        "type_k": table.at("type_k").choice(kv_types, defaults.type_k),
        "type_v": table.at("type_v").choice(kv_types, defaults.type_v),
        "flash_attn": table.at("flash_attn").of(bool, defaults.flash_attn),
        "n_gpu_layers": table.at("n_gpu_layers").of(int, defaults.n_gpu_layers),
        "idle_ttl_s": table.at("idle_ttl_s").number(defaults.idle_ttl_s, above=0),
        "load_timeout_s": table.at("load_timeout_s").number(defaults.load_timeout_s, above=0),
        "repack": table.at("repack").choice(REPACK_CHOICES, defaults.repack),
        "options": {**defaults.options, **{
            name: _engine_option(name, value) for name, value in table.at("options").entries(optional=True).items()}},
    }
    if settings["type_v"] not in UNQUANTIZED_KV and not settings["flash_attn"]:
        # llama.cpp refuses a quantized V cache without flash attention; say so before a load fails.
        raise table.at("type_v").fail(f'a quantized V cache ("{settings["type_v"]}") needs flash_attn = true')
    return settings


# llama_cpp.server flags that move its unauthenticated API off 127.0.0.1 (its config file may set both).
_ENGINE_ADDRESS_FLAGS = ("host", "port", "config_file")
_OPTION_NAME = re.compile(r"[a-z0-9_]+")


def _engine_option(name: str, option: Reader) -> str | int | float | bool:
    """An engine option, passed as `--name value`: never one that sets where the engine listens."""
    if not _OPTION_NAME.fullmatch(name):
        raise option.fail("an engine option is a flag name of llama_cpp.server: lower-case letters, digits and '_'")
    # argparse takes an unambiguous prefix for the whole flag: "hos" is --host.
    if any(flag.startswith(name) for flag in _ENGINE_ADDRESS_FLAGS):
        raise option.fail("hybridd chooses where an engine listens (127.0.0.1, a free port): the engine has no "
                          "authentication, so options may not set host, port or config_file")
    value = option.of((str, int, float, bool), want="a string, number or boolean")
    if isinstance(value, str) and value.startswith("-") and not _is_number(value):
        raise option.fail(f"must not start with '-' (it would be read as another engine flag), got {value!r}")
    return value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _path(value: str, base_dir: Path) -> Path:
    path = Path(os.path.expandvars(value)).expanduser()
    return path if path.is_absolute() else base_dir / path


def _check_unique(models: tuple[ModelEntry, ...], items: list[Reader]) -> None:
    seen: dict[str, str] = {}
    for model, item in zip(models, items, strict=True):
        names = item.at("aliases").items(optional=True)
        for j, name in enumerate((model.name, *model.aliases)):
            where = item.at("name") if j == 0 else names[j - 1]
            if name in seen:
                raise where.fail(f'"{name}" is already used by {seen[name]}')
            seen[name] = where.path
