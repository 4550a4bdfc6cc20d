"""Config: TOML text to a typed, validated Config. Pure: reading the file is the caller's business.

Every error is one line that names the dotted key and, where there is a fixed set, the valid choices:
    models[1].type_v: unknown cache type "q9" (valid: bf16, f16, f32, iq4_nl, q4_0, q4_1, q5_0, q5_1, q8_0)
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hybridd.errors import ConfigError

DEFAULT_LISTEN = "127.0.0.1:11435"
DEFAULT_PORT = 11435
ENGINE_KINDS = ("llama-cpp-python", "external", "peer-only")
# ggml type ids as llama.cpp numbers them (ggml.h enum ggml_type); llama_cpp.server takes the id.
KV_CACHE_TYPES = {
    "f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "iq4_nl": 20, "bf16": 30,
}
UNQUANTIZED_KV = ("f32", "f16", "bf16")
LOG_LEVELS = ("debug", "info", "warning", "error")
ROLES = ("desktop", "peer")
DEFAULT_LAN_PORT = 11436
REPACK_CHOICES = ("auto", "on", "off")


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

    @property
    def listen(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class EngineDefaults:
    """Settings every model inherits unless its own entry overrides them."""

    kind: str = "llama-cpp-python"
    python: str = ""
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
        settings: dict[str, Any] = {
            "engine": self.kind, "ctx": self.ctx, "type_k": self.type_k, "type_v": self.type_v,
            "flash_attn": self.flash_attn, "n_gpu_layers": self.n_gpu_layers, "idle_ttl_s": self.idle_ttl_s,
            "load_timeout_s": self.load_timeout_s, "repack": self.repack, "options": dict(self.options),
        }
        return ModelEntry(name=name, path=path, **{**settings, **overrides})


@dataclass(frozen=True)
class ModelEntry:
    """One model hybridd serves: a local GGUF run by a managed engine, or an external OpenAI-compatible URL."""

    name: str
    path: Path | None = None
    base_url: str | None = None
    api_key: str | None = None
    upstream_model: str | None = None
    profile: str | None = None
    quant: str | None = None
    aliases: tuple[str, ...] = ()
    engine: str = "llama-cpp-python"
    ctx: int = 8192
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: bool = False
    n_gpu_layers: int = -1
    idle_ttl_s: float = 900.0
    load_timeout_s: float = 180.0
    repack: str = "auto"
    # Off by default: with embeddings on, llama.cpp outputs an embedding for every token, slowing generation.
    embeddings: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def managed(self) -> bool:
        """True when hybridd runs the engine process itself."""
        return self.engine == "llama-cpp-python"

    @property
    def local(self) -> bool:
        """True when this node can serve the model itself (a GGUF here or an external URL)."""
        return self.engine != "peer-only"


@dataclass(frozen=True)
class BudgetDevice:
    """A device given by config instead of probed: a memory budget hybridd may fill (tests, or a cap)."""

    name: str
    memory_bytes: int
    bandwidth_bytes_s: float = 1.0e12
    unified: bool = False


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
class Config:
    """The whole daemon config."""

    server: ServerConfig = ServerConfig()
    engine: EngineDefaults = EngineDefaults()
    node: NodeConfig = NodeConfig()
    peers: tuple[PeerConfig, ...] = ()
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
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    return _Reader(source, base_dir or Path.cwd()).config(raw)


def load_config(path: Path) -> Config:
    """Read and validate the config file at path."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from exc
    return parse_config(text, source=str(path), base_dir=path.parent)


def with_role(config: Config, role: str) -> Config:
    """The config with node.role replaced (the --role flag wins over the file)."""
    if role not in ROLES:
        raise ConfigError(f'{config.source}: node.role: unknown value "{role}" (valid: {", ".join(ROLES)})')
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
        raise ConfigError(f'{source}: {key}: expected "host:port" (e.g. "{DEFAULT_LISTEN}"), got "{value}"')
    return host.strip("[]"), int(port_text)


def _check_loopback(server: ServerConfig, source: str) -> None:
    if not is_loopback_host(server.host) and not server.allow_non_loopback:
        raise ConfigError(
            f'{source}: server.listen: "{server.listen}" is not a loopback address; the local API has no '
            "authentication, so set server.allow_non_loopback = true to expose it on purpose"
        )


class _Reader:
    """Walks the parsed TOML, checking each key against the schema and remembering where it is."""

    def __init__(self, source: str, base_dir: Path) -> None:
        self.source = source
        self.base_dir = base_dir

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key}: {problem}")

    def table(self, raw: Any, key: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(raw, dict):
            raise self.fail(key, f"expected a table, got {_kind(raw)}")
        for name in raw:
            if name not in allowed:
                where = f"{key}.{name}" if key else name
                raise self.fail(where, f"unknown key (valid: {', '.join(sorted(allowed))})")
        return raw

    def get(self, raw: dict[str, Any], key: str, name: str, kind: type | tuple[type, ...], default: Any) -> Any:
        if name not in raw:
            return default
        value = raw[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int in Python; a TOML `true` where a number is expected is a mistake.
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            wanted = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
            raise self.fail(f"{key}.{name}" if key else name, f"expected {wanted}, got {_kind(value)}")
        return value

    def positive(self, raw: dict[str, Any], key: str, name: str, default: float) -> float:
        value = self.get(raw, key, name, (int, float), default)
        if value <= 0:
            raise self.fail(f"{key}.{name}", f"must be > 0, got {value}")
        return float(value)

    def choice(self, raw: dict[str, Any], key: str, name: str, choices: tuple[str, ...], default: str) -> str:
        value = self.get(raw, key, name, str, default)
        if value not in choices:
            raise self.fail(f"{key}.{name}", f'unknown value "{value}" (valid: {", ".join(choices)})')
        return str(value)

    def path(self, value: str) -> Path:
        path = Path(os.path.expandvars(value)).expanduser()
        return path if path.is_absolute() else self.base_dir / path

    def config(self, raw: dict[str, Any]) -> Config:
        self.table(raw, "", ("server", "engine", "node", "peers", "models", "library", "state_dir"))
        server = self.server(raw.get("server", {}))
        node = self.node(raw.get("node", {}))
        peers = tuple(self.peer(item, f"peers[{i}]") for i, item in enumerate(self.get(raw, "", "peers", list, [])))
        names = [p.name for p in peers]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise self.fail(f"peers[{i}].name", f'"{name}" is already used by peers[{names.index(name)}]')
        engine = self.engine(raw.get("engine", {}))
        library = self.table(raw.get("library", {}), "library", ("dirs",))
        dirs = self.get(library, "library", "dirs", list, [])
        for i, item in enumerate(dirs):
            if not isinstance(item, str):
                raise self.fail(f"library.dirs[{i}]", f"expected a string, got {_kind(item)}")
        models_raw = self.get(raw, "", "models", list, [])
        models = tuple(self.model(item, f"models[{i}]", engine) for i, item in enumerate(models_raw))
        self.check_unique(models)
        state = self.get(raw, "", "state_dir", str, None)
        return Config(
            server=server,
            engine=engine,
            node=node,
            peers=peers,
            models=models,
            library_dirs=tuple(self.path(d) for d in dirs),
            state_dir=self.path(state) if state else None,
            source=self.source,
        )

    def server(self, raw: Any) -> ServerConfig:
        key = "server"
        raw = self.table(
            raw, key,
            ("listen", "allow_non_loopback", "extra_hosts", "max_body_bytes", "shutdown_grace_s", "log_level",
             "lan_listen"),
        )
        host, port = parse_listen(self.get(raw, key, "listen", str, DEFAULT_LISTEN), "server.listen", self.source)
        extra = self.get(raw, key, "extra_hosts", list, [])
        if not all(isinstance(h, str) for h in extra):
            raise self.fail("server.extra_hosts", "expected an array of strings")
        max_body = self.get(raw, key, "max_body_bytes", int, ServerConfig.max_body_bytes)
        if max_body < 1024:
            raise self.fail("server.max_body_bytes", f"must be >= 1024, got {max_body}")
        server = ServerConfig(
            host=host,
            port=port,
            allow_non_loopback=self.get(raw, key, "allow_non_loopback", bool, False),
            extra_hosts=tuple(h.lower() for h in extra),
            max_body_bytes=max_body,
            shutdown_grace_s=self.positive(raw, key, "shutdown_grace_s", ServerConfig.shutdown_grace_s),
            log_level=self.choice(raw, key, "log_level", LOG_LEVELS, "info"),
            lan_listen=self.get(raw, key, "lan_listen", str, ""),
        )
        if server.lan_listen:
            parse_listen(server.lan_listen, "server.lan_listen", self.source)
        _check_loopback(server, self.source)
        return server

    def node(self, raw: Any) -> NodeConfig:
        key = "node"
        raw = self.table(raw, key, ("name", "role", "hardware", "devices", "ram_bytes", "ram_bandwidth_bytes_s",
                                    "disk_read_bytes_s", "display_reserve_bytes", "queue_limit",
                                    "default_max_tokens", "peer_first_byte_timeout_s", "peer_idle_timeout_s"))
        devices = []
        for i, item in enumerate(self.get(raw, key, "devices", list, [])):
            where = f"node.devices[{i}]"
            item = self.table(item, where, ("name", "memory_bytes", "bandwidth_bytes_s", "unified"))
            name = self.get(item, where, "name", str, f"budget{i}")
            devices.append(BudgetDevice(
                name=name, memory_bytes=int(self.positive(item, where, "memory_bytes", 0) or 0),
                bandwidth_bytes_s=self.positive(item, where, "bandwidth_bytes_s", BudgetDevice.bandwidth_bytes_s),
                unified=self.get(item, where, "unified", bool, False),
            ))
        ram = self.get(raw, key, "ram_bytes", int, None)
        return NodeConfig(
            name=self.get(raw, key, "name", str, ""),
            role=self.choice(raw, key, "role", ROLES, "desktop"),
            hardware=self.get(raw, key, "hardware", str, ""),
            devices=tuple(devices),
            ram_bytes=ram,
            ram_bandwidth_bytes_s=self.positive(raw, key, "ram_bandwidth_bytes_s", NodeConfig.ram_bandwidth_bytes_s),
            disk_read_bytes_s=self.positive(raw, key, "disk_read_bytes_s", NodeConfig.disk_read_bytes_s),
            display_reserve_bytes=self.get(raw, key, "display_reserve_bytes", int, NodeConfig.display_reserve_bytes),
            queue_limit=int(self.positive(raw, key, "queue_limit", NodeConfig.queue_limit)),
            default_max_tokens=int(self.positive(raw, key, "default_max_tokens", NodeConfig.default_max_tokens)),
            peer_first_byte_timeout_s=self.positive(raw, key, "peer_first_byte_timeout_s",
                                                    NodeConfig.peer_first_byte_timeout_s),
            peer_idle_timeout_s=self.positive(raw, key, "peer_idle_timeout_s", NodeConfig.peer_idle_timeout_s),
        )

    def peer(self, raw: Any, key: str) -> PeerConfig:
        raw = self.table(raw, key, ("name", "base_url", "hardware", "models", "api_key"))
        name = self.get(raw, key, "name", str, None)
        if not name or not all(c.isalnum() or c in "-_." for c in name):
            raise self.fail(f"{key}.name", "required: letters, digits, '-', '_' or '.' (it appears in headers)")
        base_url = self.get(raw, key, "base_url", str, None)
        if not base_url or not base_url.startswith(("http://", "https://")):
            raise self.fail(f"{key}.base_url", 'required: the peer\'s OpenAI URL, e.g. "http://spark.local:11435"')
        hardware = self.get(raw, key, "hardware", str, None)
        if not hardware:
            raise self.fail(f"{key}.hardware", 'required: a hardware profile name, e.g. "dgx-spark"')
        models = self.get(raw, key, "models", list, [])
        if not all(isinstance(m, str) for m in models):
            raise self.fail(f"{key}.models", "expected an array of model ids")
        return PeerConfig(name=name, base_url=base_url.rstrip("/").removesuffix("/v1"), hardware=hardware,
                          models=tuple(models), api_key=self.get(raw, key, "api_key", str, None))

    def engine(self, raw: Any) -> EngineDefaults:
        key = "engine"
        raw = self.table(raw, key, (*_ENGINE_KEYS, "kind", "python"))
        kv = self.kv_types(raw, key, EngineDefaults.type_k, EngineDefaults.type_v, EngineDefaults.flash_attn)
        return EngineDefaults(
            kind=self.choice(raw, key, "kind", ENGINE_KINDS[:1], EngineDefaults.kind),
            python=self.get(raw, key, "python", str, ""),
            load_timeout_s=self.positive(raw, key, "load_timeout_s", EngineDefaults.load_timeout_s),
            idle_ttl_s=self.positive(raw, key, "idle_ttl_s", EngineDefaults.idle_ttl_s),
            ctx=self.ctx(raw, key, EngineDefaults.ctx),
            type_k=kv[0],
            type_v=kv[1],
            flash_attn=kv[2],
            n_gpu_layers=self.get(raw, key, "n_gpu_layers", int, -1),
            repack=self.choice(raw, key, "repack", REPACK_CHOICES, EngineDefaults.repack),
            options=self.options(raw, key),
        )

    def model(self, raw: Any, key: str, defaults: EngineDefaults) -> ModelEntry:
        raw = self.table(raw, key, (*_ENGINE_KEYS, *_MODEL_KEYS))
        name = self.get(raw, key, "name", str, None)
        if not name:
            raise self.fail(f"{key}.name", "required: the model id clients ask for")
        aliases = self.get(raw, key, "aliases", list, [])
        if not all(isinstance(a, str) and a for a in aliases):
            raise self.fail(f"{key}.aliases", "expected an array of non-empty strings")
        path = self.get(raw, key, "path", str, None)
        base_url = self.get(raw, key, "base_url", str, None)
        profile = self.get(raw, key, "profile", str, None)
        implied = "external" if base_url else "peer-only" if profile and not path else defaults.kind
        engine = self.choice(raw, key, "engine", ENGINE_KINDS, implied)
        if engine == "peer-only":
            if not profile:
                raise self.fail(f"{key}.profile", "a model served only by peers needs a model profile name")
        elif engine == "external":
            if not base_url or not base_url.startswith(("http://", "https://")):
                raise self.fail(f"{key}.base_url", 'an external model needs an http(s) URL, e.g. "http://127.0.0.1:8080"')
            if path:
                raise self.fail(f"{key}.path", "an external model has a base_url, not a path")
        elif not path:
            raise self.fail(f"{key}.path", "required: the GGUF file to serve (or set base_url for an external server)")
        kv = self.kv_types(raw, key, defaults.type_k, defaults.type_v, defaults.flash_attn)
        return ModelEntry(
            name=name,
            path=self.path(path) if path else None,
            base_url=base_url.rstrip("/") if base_url else None,
            api_key=self.get(raw, key, "api_key", str, None),
            upstream_model=self.get(raw, key, "upstream_model", str, None),
            profile=profile,
            quant=self.get(raw, key, "quant", str, None),
            aliases=tuple(aliases),
            engine=engine,
            ctx=self.ctx(raw, key, defaults.ctx),
            type_k=kv[0],
            type_v=kv[1],
            flash_attn=kv[2],
            n_gpu_layers=self.get(raw, key, "n_gpu_layers", int, defaults.n_gpu_layers),
            idle_ttl_s=self.positive(raw, key, "idle_ttl_s", defaults.idle_ttl_s),
            load_timeout_s=self.positive(raw, key, "load_timeout_s", defaults.load_timeout_s),
            embeddings=self.get(raw, key, "embeddings", bool, False),
            repack=self.choice(raw, key, "repack", REPACK_CHOICES, defaults.repack),
            options={**defaults.options, **self.options(raw, key)},
        )

    def ctx(self, raw: dict[str, Any], key: str, default: int) -> int:
        value = self.get(raw, key, "ctx", int, default)
        if not 256 <= value <= 4 * 1024 * 1024:
            raise self.fail(f"{key}.ctx", f"must be between 256 and 4194304 tokens, got {value}")
        return int(value)

    def kv_types(self, raw: dict[str, Any], key: str, type_k: str, type_v: str, flash: bool) -> tuple[str, str, bool]:
        choices = tuple(sorted(KV_CACHE_TYPES))
        type_k = self.choice(raw, key, "type_k", choices, type_k)
        type_v = self.choice(raw, key, "type_v", choices, type_v)
        flash = self.get(raw, key, "flash_attn", bool, flash)
        if type_v not in UNQUANTIZED_KV and not flash:
            # llama.cpp refuses a quantized V cache without flash attention; say so before a load fails.
            raise self.fail(f"{key}.type_v", f'a quantized V cache ("{type_v}") needs flash_attn = true')
        return type_k, type_v, flash

    def options(self, raw: dict[str, Any], key: str) -> dict[str, Any]:
        options = self.get(raw, key, "options", dict, {})
        for name, value in options.items():
            if not isinstance(value, str | int | float | bool):
                raise self.fail(f"{key}.options.{name}", f"expected a string, number or boolean, got {_kind(value)}")
        return dict(options)

    def check_unique(self, models: tuple[ModelEntry, ...]) -> None:
        seen: dict[str, str] = {}
        for i, model in enumerate(models):
            for j, name in enumerate((model.name, *model.aliases)):
                where = f"models[{i}].name" if j == 0 else f"models[{i}].aliases[{j - 1}]"
                if name in seen:
                    raise self.fail(where, f'"{name}" is already used by {seen[name]}')
                seen[name] = where


_ENGINE_KEYS = ("ctx", "type_k", "type_v", "flash_attn", "n_gpu_layers", "idle_ttl_s", "load_timeout_s", "options",
                "repack")
_MODEL_KEYS = ("name", "path", "base_url", "api_key", "aliases", "engine", "embeddings", "upstream_model", "profile",
               "quant")
_TYPE_NAMES: dict[type, str] = {
    str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "an array", dict: "a table",
}


def _kind(value: Any) -> str:
    for kind, name in _TYPE_NAMES.items():
        if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            return name
    return type(value).__name__
