"""Hardware profiles: a named machine's devices, memory, bandwidth and published speed points, from TOML.

Files live in `<repo>/profiles/hardware/<name>.toml`; `HYBRIDD_PROFILES_DIR` points at another `profiles` dir.
Parsing (`hardware_profile_from_toml`) is a pure function of the text; only `load_hardware_profile` and
`list_hardware_profiles` touch the disk. Every error is a `ProfileError` naming the file and the dotted key.

    HybriddError
    └── ConfigError
        └── ProfileError      unknown profile name (lists the valid ones) or bad content (names the key)
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hybridd.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable

    from hybridd.model.spec import ModelSpec
    from hybridd.place.devices import Device
    from hybridd.place.hardware import Hardware, SpeedPoint

PROFILES_DIR_ENV = "HYBRIDD_PROFILES_DIR"
_REPO_PROFILES_DIR = Path(__file__).resolve().parents[2] / "profiles"


class ProfileError(ConfigError):
    """A hardware or model profile is unknown or its file is invalid."""


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator as published: memory, bandwidth, whether it is the host's RAM, headroom to keep."""

    name: str
    memory_bytes: int
    bandwidth_bytes_s: float
    unified: bool
    reserve_bytes: int


@dataclass(frozen=True)
class MeasuredPoint:
    """A published single-stream speed for a model on this hardware, for calibrating the speed model."""

    model: str
    engine: str
    decode_tok_s: float
    source: str
    decode_tok_s_high: float | None = None
    prefill_tok_s: float | None = None
    quant: str | None = None
    context_tokens: int | None = None
    cpu_layers: int = 0
    nodes: int = 1
    note: str = ""


@dataclass(frozen=True)
class HardwareProfile:
    """A named machine: its accelerators, system RAM, and measured points, with the sources they come from."""

    name: str
    description: str
    device_specs: tuple[DeviceSpec, ...]
    system_ram_bytes: int
    system_ram_bandwidth_bytes_s: float
    measured: tuple[MeasuredPoint, ...]
    sources: tuple[str, ...]

    def devices(self, reserve_bytes: int | None = None) -> list[Device]:
        """The accelerators as idle placement devices (free == total); reserve_bytes overrides defaults."""
        from hybridd.place.devices import Device

        return [
            Device(
                name=spec.name,
                total_bytes=spec.memory_bytes,
                free_bytes=spec.memory_bytes,
                unified=spec.unified,
                reserve_bytes=spec.reserve_bytes if reserve_bytes is None else reserve_bytes,
                bandwidth_bytes_s=spec.bandwidth_bytes_s,
            )
            for spec in self.device_specs
        ]

    def hardware(self, spec_for: Callable[[str, str | None], ModelSpec | None] | None = None,
                 disk_read_bytes_s: float | None = None) -> Hardware:
        """This profile as placement `Hardware` (idle devices), its measured points resolved to model specs.

        `spec_for(model, quant)` resolves a point's model; the default reads the model profiles and returns None
        for a model or quant without one (the point is then kept but cannot calibrate).
        """
        from hybridd.place.hardware import DEFAULT_DISK_READ_BYTES_S, Hardware

        resolve = spec_for or _spec_from_model_profile
        devices = tuple(self.devices())
        return Hardware(
            name=self.name,
            devices=devices,
            ram_bytes=0 if any(d.unified for d in devices) else self.system_ram_bytes,
            ram_bandwidth_bytes_s=self.system_ram_bandwidth_bytes_s,
            disk_read_bytes_s=disk_read_bytes_s or DEFAULT_DISK_READ_BYTES_S,
            measured=tuple(_speed_point(p, resolve(p.model, p.quant)) for p in self.measured),
        )


def _speed_point(point: MeasuredPoint, spec: ModelSpec | None) -> SpeedPoint:
    from hybridd.place.hardware import SpeedPoint

    # a published range stands for its midpoint: runs and quants spread over it
    decode = point.decode_tok_s if point.decode_tok_s_high is None else (point.decode_tok_s +
                                                                          point.decode_tok_s_high) / 2
    return SpeedPoint(model=point.model, engine=point.engine, decode_tok_s=decode, spec=spec,
                      prefill_tok_s=point.prefill_tok_s, context_tokens=point.context_tokens or 0,
                      cpu_layers=point.cpu_layers, nodes=point.nodes)


_SPEC_CACHE: dict[tuple[str, str, str | None], ModelSpec | None] = {}


def _spec_from_model_profile(model: str, quant: str | None) -> ModelSpec | None:
    """The spec of a model profile at `quant` (an unnamed quant is the profile's first); None if unknown."""
    from hybridd.probe.model_profiles import models_dir

    key = (str(models_dir()), model, quant)
    if key not in _SPEC_CACHE:
        from hybridd.model.spec import model_spec
        from hybridd.probe.model_profiles import ProfileError as ModelProfileError
        from hybridd.probe.model_profiles import load_profile, profile_header

        try:
            header = profile_header(load_profile(model), quant)
        except ModelProfileError:
            _SPEC_CACHE[key] = None
        else:
            _SPEC_CACHE[key] = model_spec(header.metadata, header.tensors)
    return _SPEC_CACHE[key]


def profiles_dir() -> Path:
    """The `profiles` directory: `$HYBRIDD_PROFILES_DIR` when set, else the one shipped in the repository."""
    override = os.environ.get(PROFILES_DIR_ENV)
    return Path(override) if override else _REPO_PROFILES_DIR


def list_hardware_profiles(root: Path | None = None) -> list[str]:
    """Names of the hardware profiles available, sorted."""
    hardware_dir = (root or profiles_dir()) / "hardware"
    if not hardware_dir.is_dir():
        return []
    return sorted(path.stem for path in hardware_dir.glob("*.toml"))


def load_hardware_profile(name: str, root: Path | None = None) -> HardwareProfile:
    """Read and validate one hardware profile; an unknown name lists the valid ones."""
    valid = list_hardware_profiles(root)
    if name not in valid:
        raise ProfileError(f"unknown hardware profile {name!r} (valid: {', '.join(valid) or 'none found'})")
    path = (root or profiles_dir()) / "hardware" / f"{name}.toml"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    return hardware_profile_from_toml(text, name=name, origin=str(path))


def hardware_profile_from_toml(text: str, name: str, origin: str = "<text>") -> HardwareProfile:
    """Parse a hardware profile from TOML text; `name` must match the file's `name` key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{origin}: not valid TOML: {exc}") from exc
    reader = _Reader(origin)
    reader.only_keys(data, "", {"name", "description", "sources", "system", "devices", "measured"})
    declared = reader.string(data, "name")
    if declared != name:
        raise ProfileError(f"{origin}: name: {declared!r} does not match the profile name {name!r}")
    system = reader.table(data, "system")
    reader.only_keys(system, "system", {"ram_bytes", "ram_bandwidth_bytes_s"})
    return HardwareProfile(
        name=declared,
        description=reader.string(data, "description"),
        device_specs=tuple(
            reader.device(item, f"devices[{i}]") for i, item in enumerate(reader.tables(data, "devices"))
        ),
        system_ram_bytes=reader.positive_int(system, "ram_bytes", "system."),
        system_ram_bandwidth_bytes_s=reader.positive_float(system, "ram_bandwidth_bytes_s", "system."),
        measured=tuple(
            reader.measured(item, f"measured[{i}]") for i, item in enumerate(reader.tables(data, "measured"))
        ),
        sources=reader.sources(data),
    )


class _Reader:
    """Typed access to parsed TOML whose every failure names the file and the dotted key."""

    _DEVICE_KEYS = frozenset({"name", "memory_bytes", "bandwidth_bytes_s", "unified", "reserve_bytes"})
    _MEASURED_KEYS = frozenset(
        {
            "model",
            "engine",
            "decode_tok_s",
            "decode_tok_s_high",
            "prefill_tok_s",
            "quant",
            "context_tokens",
            "cpu_layers",
            "nodes",
            "note",
            "source",
        }
    )

    def __init__(self, origin: str) -> None:
        self.origin = origin

    def fail(self, key: str, problem: str) -> ProfileError:
        return ProfileError(f"{self.origin}: {key}: {problem}")

    def only_keys(self, table: dict[str, Any], prefix: str, allowed: set[str] | frozenset[str]) -> None:
        unknown = sorted(set(table) - set(allowed))
        if unknown:
            key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
            raise self.fail(key, f"unknown key (valid: {', '.join(sorted(allowed))})")

    def _get(self, table: dict[str, Any], key: str, prefix: str) -> Any:
        if key not in table:
            raise self.fail(prefix + key, "missing")
        return table[key]

    def string(self, table: dict[str, Any], key: str, prefix: str = "") -> str:
        value = self._get(table, key, prefix)
        if not isinstance(value, str) or not value.strip():
            raise self.fail(prefix + key, f"expected a non-empty string, got {value!r}")
        return value

    def optional_string(self, table: dict[str, Any], key: str, prefix: str) -> str | None:
        return self.string(table, key, prefix) if key in table else None

    def positive_int(self, table: dict[str, Any], key: str, prefix: str = "") -> int:
        value = self._get(table, key, prefix)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self.fail(prefix + key, f"expected a positive integer, got {value!r}")
        return value

    def non_negative_int(self, table: dict[str, Any], key: str, prefix: str, default: int) -> int:
        value = table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.fail(prefix + key, f"expected a non-negative integer, got {value!r}")
        return value

    def positive_float(self, table: dict[str, Any], key: str, prefix: str = "") -> float:
        value = self._get(table, key, prefix)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise self.fail(prefix + key, f"expected a positive number, got {value!r}")
        return float(value)

    def optional_positive_float(self, table: dict[str, Any], key: str, prefix: str) -> float | None:
        return self.positive_float(table, key, prefix) if key in table else None

    def boolean(self, table: dict[str, Any], key: str, prefix: str) -> bool:
        value = self._get(table, key, prefix)
        if not isinstance(value, bool):
            raise self.fail(prefix + key, f"expected true or false, got {value!r}")
        return value

    def table(self, data: dict[str, Any], key: str) -> dict[str, Any]:
        value = self._get(data, key, "")
        if not isinstance(value, dict):
            raise self.fail(key, "expected a table")
        return value

    def tables(self, data: dict[str, Any], key: str) -> list[dict[str, Any]]:
        value = data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
            raise self.fail(key, "expected an array of tables ([[" + key + "]])")
        return value

    def sources(self, data: dict[str, Any]) -> tuple[str, ...]:
        value = self._get(data, "sources", "")
        if not isinstance(value, list) or not value or not all(isinstance(s, str) and s for s in value):
            raise self.fail("sources", "expected a non-empty array of strings (where each figure comes from)")
        return tuple(value)

    def device(self, table: dict[str, Any], prefix: str) -> DeviceSpec:
        self.only_keys(table, prefix, self._DEVICE_KEYS)
        dotted = prefix + "."
        return DeviceSpec(
            name=self.string(table, "name", dotted),
            memory_bytes=self.positive_int(table, "memory_bytes", dotted),
            bandwidth_bytes_s=self.positive_float(table, "bandwidth_bytes_s", dotted),
            unified=self.boolean(table, "unified", dotted),
            reserve_bytes=self.non_negative_int(table, "reserve_bytes", dotted, default=0),
        )

    def measured(self, table: dict[str, Any], prefix: str) -> MeasuredPoint:
        self.only_keys(table, prefix, self._MEASURED_KEYS)
        dotted = prefix + "."
        context = table.get("context_tokens")
        return MeasuredPoint(
            model=self.string(table, "model", dotted),
            engine=self.string(table, "engine", dotted),
            decode_tok_s=self.positive_float(table, "decode_tok_s", dotted),
            source=self.string(table, "source", dotted),
            decode_tok_s_high=self.optional_positive_float(table, "decode_tok_s_high", dotted),
            prefill_tok_s=self.optional_positive_float(table, "prefill_tok_s", dotted),
            quant=self.optional_string(table, "quant", dotted),
            context_tokens=None if context is None else self.positive_int(table, "context_tokens", dotted),
            cpu_layers=self.non_negative_int(table, "cpu_layers", dotted, default=0),
            nodes=self.positive_int(table, "nodes", dotted) if "nodes" in table else 1,
            note=self.string(table, "note", dotted) if "note" in table else "",
        )
