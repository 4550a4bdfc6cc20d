"""Hardware profiles: a named machine's devices, memory, bandwidth and published speed points, from TOML.

Files live in `<repo>/profiles/hardware/<name>.toml`; `HYBRIDD_PROFILES_DIR` points at another `profiles` dir.
Parsing (`hardware_profile_from_toml`) is a pure function of the text; only `load_hardware_profile` and
`list_hardware_profiles` touch the disk. Every error is a `ProfileError` (hybridd.errors) naming the file and the
dotted key, or for an unknown name the valid ones.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hybridd.errors import ModelProfileError, ProfileError
from hybridd.model.spec import ModelSpec, model_spec
from hybridd.place.devices import Device
from hybridd.place.hardware import DEFAULT_DISK_READ_BYTES_S, Hardware, SpeedPoint
from hybridd.probe.model_profiles import load_profile, models_dir, profile_header
from hybridd.validate import Reader, field_names

PROFILES_DIR_ENV = "HYBRIDD_PROFILES_DIR"
_REPO_PROFILES_DIR = Path(__file__).resolve().parents[2] / "profiles"


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator as published: memory, bandwidth, whether it is the host's RAM, headroom to keep."""

    name: str
    memory_bytes: int
    bandwidth_bytes_s: float
    unified: bool
    reserve_bytes: int
    compute_capability: int = 0  # CUDA major x 10 + minor; 0 unknown (the speed model's kernel rule needs it)
    sm_count: int = 0


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
    ctx: int | None = None  # the engine's context (-c); None: prompt + completion, as llama-bench sizes it
    prompt_tokens: int = 0  # tokens cached when decoding starts: llama-bench -d, or the request's prompt
    completion_tokens: int = 128  # tokens generated (tg128, tg32)
    kv_type: str = "f16"
    cpu_layers: int = 0
    nodes: int = 1
    note: str = ""
    file_bytes: int | None = None  # the measured file's size where it is not the quant's published one (a twin)


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
        return [
            Device(
                name=spec.name,
                total_bytes=spec.memory_bytes,
                free_bytes=spec.memory_bytes,
                unified=spec.unified,
                reserve_bytes=spec.reserve_bytes if reserve_bytes is None else reserve_bytes,
                bandwidth_bytes_s=spec.bandwidth_bytes_s,
                compute_capability=spec.compute_capability,
                sm_count=spec.sm_count,
            )
            for spec in self.device_specs
        ]

    def hardware(self, spec_for: Callable[[str, str | None, int | None], ModelSpec | None] | None = None,
                 disk_read_bytes_s: float | None = None) -> Hardware:
        """This profile as placement `Hardware` (idle devices), its measured points resolved to model specs.

        `spec_for(model, quant, file_bytes)` resolves a point's model; the default reads the model profiles and
        returns None for a model or quant without one (the point is then kept but cannot calibrate).
        """
        resolve = spec_for or _spec_from_model_profile
        devices = tuple(self.devices())
        return Hardware(
            name=self.name,
            devices=devices,
            ram_bytes=0 if any(d.unified for d in devices) else self.system_ram_bytes,
            ram_bandwidth_bytes_s=self.system_ram_bandwidth_bytes_s,
            disk_read_bytes_s=disk_read_bytes_s or DEFAULT_DISK_READ_BYTES_S,
            measured=tuple(_speed_point(p, resolve(p.model, p.quant, p.file_bytes)) for p in self.measured),
        )


def _speed_point(point: MeasuredPoint, spec: ModelSpec | None) -> SpeedPoint:
    # a published range stands for its midpoint: runs and quants spread over it
    decode = point.decode_tok_s if point.decode_tok_s_high is None else (point.decode_tok_s +
                                                                          point.decode_tok_s_high) / 2
    high = point.decode_tok_s_high or point.decode_tok_s
    return SpeedPoint(model=point.model, engine=point.engine, decode_tok_s=decode, spec=spec,
                      prefill_tok_s=point.prefill_tok_s, prompt_tokens=point.prompt_tokens,
                      completion_tokens=point.completion_tokens, ctx=point.ctx or 0, kv_type=point.kv_type,
                      cpu_layers=point.cpu_layers, nodes=point.nodes, quant=point.quant,
                      decode_low=point.decode_tok_s, decode_high=high)


_SPEC_CACHE: dict[tuple[str, str, str | None, int | None], ModelSpec | None] = {}


def _spec_from_model_profile(model: str, quant: str | None, file_bytes: int | None = None) -> ModelSpec | None:
    """The spec of a model profile at `quant` (an unnamed quant is the profile's first), its tensors sized to
    `file_bytes` when given; None if unknown."""
    key = (str(models_dir()), model, quant, file_bytes)
    if key not in _SPEC_CACHE:
        try:
            header = profile_header(load_profile(model), quant, file_bytes)
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
    doc = Reader(data, ProfileError, prefix=f"{origin}: ").table(_PROFILE_KEYS)
    declared = _text(doc.at("name"))
    if declared != name:
        raise doc.at("name").fail(f"{declared!r} does not match the profile name {name!r}")
    system = doc.at("system").table(_SYSTEM_KEYS)
    sources = doc.at("sources").items()
    if not sources:
        raise doc.at("sources").fail("expected a non-empty array of strings (where each figure comes from)")
    return HardwareProfile(
        name=declared,
        description=_text(doc.at("description")),
        device_specs=tuple(_device(item) for item in doc.at("devices").items(optional=True)),
        system_ram_bytes=system.at("ram_bytes").integer(above=0),
        system_ram_bandwidth_bytes_s=system.at("ram_bandwidth_bytes_s").number(above=0),
        measured=tuple(_measured(item) for item in doc.at("measured").items(optional=True)),
        sources=tuple(_text(source) for source in sources),
    )


_PROFILE_KEYS = ("name", "description", "sources", "system", "devices", "measured")
_SYSTEM_KEYS = ("ram_bytes", "ram_bandwidth_bytes_s")


def _text(reader: Reader) -> str:
    value = reader.text()
    if not value.strip():
        raise reader.fail("must not be blank")
    return value


def _device(item: Reader) -> DeviceSpec:
    table = item.table(field_names(DeviceSpec))
    return DeviceSpec(
        name=_text(table.at("name")),
        memory_bytes=table.at("memory_bytes").integer(above=0),
        bandwidth_bytes_s=table.at("bandwidth_bytes_s").number(above=0),
        unified=table.at("unified").of(bool),
        reserve_bytes=table.at("reserve_bytes").integer(0, low=0),
        compute_capability=table.at("compute_capability").integer(0, low=0),
        sm_count=table.at("sm_count").integer(0, low=0),
    )


def _measured(item: Reader) -> MeasuredPoint:
    table = item.table(field_names(MeasuredPoint))
    note = table.at("note")
    return MeasuredPoint(
        model=_text(table.at("model")),
        engine=_text(table.at("engine")),
        decode_tok_s=table.at("decode_tok_s").number(above=0),
        source=_text(table.at("source")),
        decode_tok_s_high=table.at("decode_tok_s_high").number(None, above=0),
        prefill_tok_s=table.at("prefill_tok_s").number(None, above=0),
        quant=_text(table.at("quant")) if table.at("quant").present else None,
        ctx=table.at("ctx").integer(None, above=0),
        prompt_tokens=table.at("prompt_tokens").integer(0, low=0),
        completion_tokens=table.at("completion_tokens").integer(128, above=0),
        kv_type=_text(table.at("kv_type")) if table.at("kv_type").present else "f16",
        cpu_layers=table.at("cpu_layers").integer(0, low=0),
        nodes=table.at("nodes").integer(1, above=0),
        note=_text(note) if note.present else "",
        file_bytes=table.at("file_bytes").integer(None, above=0),
    )
