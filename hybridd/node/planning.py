"""`hybridd plan` and POST /hybridd/v1/plan: find the model's header and the devices, then ask the pure planner.

The model is a GGUF path, a configured model id or alias, or a profile model name; the devices are a hardware
profile or, without one, this machine as NVML and psutil see it now.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hybridd.node.catalog import Catalog
from hybridd.config import KV_CACHE_TYPES, ModelEntry
from hybridd.errors import BadRequest, HybriddError, ModelNotFound
from hybridd.model.header import GgufHeader
from hybridd.model.memory import DEFAULT_CTX, RunSettings
from hybridd.place.plan import plan
from hybridd.model.spec import ModelSpec, model_spec
from hybridd.place.devices import Device
from hybridd.place.hardware import Hardware


@dataclass(frozen=True)
class PlanRequest:
    """What to plan: which model, at which context and cache types, on which hardware."""

    model: str
    quant: str | None = None
    ctx: int | None = None
    type_k: str | None = None
    type_v: str | None = None
    slots: int = 1
    flash_attn: bool | None = None
    hardware: str | None = None
    peers: tuple[str, ...] = ()


def plan_request_from_json(body: Mapping[str, Any]) -> PlanRequest:
    """Validate a POST /hybridd/v1/plan body; BadRequest names the field."""
    if not isinstance(body, Mapping):
        raise BadRequest("request body must be a JSON object")
    allowed = {"model", "quant", "ctx", "type_k", "type_v", "kv_type", "slots", "flash_attn", "hardware", "peers"}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadRequest(f"unknown field '{unknown[0]}' (valid: {', '.join(sorted(allowed))})")

    def field(name: str, kind: type, required: bool = False) -> Any:
        value = body.get(name)
        if value is None:
            if required:
                raise BadRequest(f"'{name}' is required")
            return None
        if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
            raise BadRequest(f"'{name}' must be {'an integer' if kind is int else 'a ' + kind.__name__}")
        return value

    kv = field("kv_type", str)
    peers = body.get("peers") or []
    if not isinstance(peers, list) or not all(isinstance(p, str) for p in peers):
        raise BadRequest("'peers' must be an array of hardware profile names")
    request = PlanRequest(
        model=field("model", str, required=True), quant=field("quant", str), ctx=field("ctx", int),
        type_k=field("type_k", str) or kv, type_v=field("type_v", str) or kv, slots=field("slots", int) or 1,
        flash_attn=field("flash_attn", bool), hardware=field("hardware", str), peers=tuple(peers),
    )
    check_request(request)
    return request


def check_request(request: PlanRequest) -> None:
    """Reject impossible settings with a message naming the field."""
    for name in ("type_k", "type_v"):
        value = getattr(request, name)
        if value is not None and value not in KV_CACHE_TYPES:
            raise BadRequest(f"{name}: unknown cache type '{value}' (valid: {', '.join(sorted(KV_CACHE_TYPES))})")
    if request.ctx is not None and not 1 <= request.ctx <= 16 * 1024 * 1024:
        raise BadRequest(f"ctx: must be between 1 and 16777216, got {request.ctx}")
    if not 1 <= request.slots <= 256:
        raise BadRequest(f"slots: must be between 1 and 256, got {request.slots}")


def entry_header(model: ModelEntry) -> GgufHeader:
    """A configured model's header: from its GGUF file, else from its profile (peer-only models)."""
    from hybridd.probe.gguf_file import read_gguf_header
    from hybridd.probe.model_profiles import load_profile, profile_header

    if model.path is not None:
        return read_gguf_header(model.path)
    if model.profile is not None:
        return profile_header(load_profile(model.profile), model.quant)
    raise HybriddError(f"model '{model.name}' has neither a GGUF path nor a profile to size it by")


def find_header(name: str, quant: str | None, catalog: Catalog | None) -> tuple[GgufHeader, dict[str, Any]]:
    """The model's header and the run settings its config implies (empty for files and profiles)."""
    from hybridd.probe.gguf_file import read_gguf_header
    from hybridd.probe.model_profiles import list_profiles, load_profile, profile_header

    if name.endswith(".gguf") or "/" in name:
        path = Path(name).expanduser()
        if not path.is_file():
            raise ModelNotFound(f"no GGUF file at {path}")
        return read_gguf_header(path), {}
    if catalog is not None:
        try:
            entry = catalog.resolve(name)
        except ModelNotFound:
            entry = None
        if entry is not None and entry.path is not None:
            settings = {"ctx": entry.ctx, "type_k": entry.type_k, "type_v": entry.type_v,
                        "flash_attn": entry.flash_attn}
            return entry_header(entry), settings
    profiles = list_profiles()
    if name in profiles:
        return profile_header(load_profile(name), quant), {}
    configured = ", ".join(m.name for m in catalog.models) if catalog else ""
    raise ModelNotFound(f"'{name}' is not a GGUF path, a configured model ({configured or 'none'}) or a model "
                        f"profile ({', '.join(profiles)})")


def find_devices(hardware: str | None) -> tuple[list[Device], int, str, Hardware]:
    """(GPUs to fit on, host RAM free, where they came from, the node as placement sees it): a hardware profile,
    or one probe of this machine."""
    if hardware:
        from hybridd.probe.hardware_profiles import load_hardware_profile

        node = load_hardware_profile(hardware).hardware()
        return list(node.devices), node.ram_bytes, f"hardware profile {hardware}", node
    from hybridd.config import Config
    from hybridd.probe.gpus import devices_from_snapshot
    from hybridd.node.resources import hardware_from_snapshot, probe_machine

    snapshot = probe_machine()
    devices = devices_from_snapshot(snapshot)
    host_free = 0 if snapshot.unified else snapshot.host_available_bytes
    label = "this machine (" + (", ".join(g.name for g in snapshot.gpus) or "no GPU: CPU only") + ")"
    return devices, host_free, label, hardware_from_snapshot(Config(), snapshot)


def make_plan(request: PlanRequest, catalog: Catalog | None = None) -> dict[str, Any]:
    """The full plan object for request."""
    check_request(request)
    header, configured = find_header(request.model, request.quant, catalog)
    spec = model_spec(header.metadata, header.tensors)
    ctx = request.ctx or configured.get("ctx") or DEFAULT_CTX
    flash = request.flash_attn if request.flash_attn is not None else configured.get("flash_attn", True)
    settings = RunSettings(
        ctx=ctx, n_seq=request.slots, flash_attn=flash,
        type_k=request.type_k or configured.get("type_k", "f16"),
        type_v=request.type_v or configured.get("type_v", "f16"),
    )
    if settings.type_v not in ("f16", "f32", "bf16") and not flash:
        raise BadRequest(f"type_v: a quantized V cache ('{settings.type_v}') needs flash attention")
    devices, host_free, source, node = find_devices(request.hardware)
    result = plan(spec, settings, devices, host_free)
    result["model"] = result.get("model") or request.model
    result["hardware"] = source
    result["file_bytes"] = header.file_bytes
    result.update(placement_options(spec, settings, node, request.peers))
    return result


def placement_options(spec: ModelSpec, settings: RunSettings, node: Hardware, peers: Sequence[str]) -> dict[str, Any]:
    """Where a reference request would run (this node or the --peer profiles) and each option's speed."""
    from hybridd.place.options import plan_options
    from hybridd.probe.hardware_profiles import load_hardware_profile

    return plan_options(spec, settings, node, [load_hardware_profile(name).hardware() for name in peers])
