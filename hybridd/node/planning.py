"""`hybridd plan` and POST /hybridd/v1/plan: find the model's header and the devices, then ask the pure planner.

The model is a GGUF path, a configured model id or alias, or a profile model name; the devices are a hardware
profile or, without one, this machine as NVML and psutil see it now.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hybridd.config import KV_CACHE_TYPES, MANAGED_KINDS, Config
from hybridd.errors import BadRequest, ModelNotFound
from hybridd.model.header import GgufHeader
from hybridd.model.memory import DEFAULT_CTX, RunSettings, engine_outputs
from hybridd.model.spec import ModelSpec, model_spec
from hybridd.model.training import (
    DEFAULT_BATCH,
    DEFAULT_RANK,
    DEFAULT_SEQ,
    TrainMethod,
    TrainSettings,
    estimate_training,
)
from hybridd.node.catalog import Catalog, entry_header
from hybridd.node.resources import hardware_from_snapshot, probe_machine
from hybridd.place.devices import Device
from hybridd.place.hardware import Hardware
from hybridd.place.options import plan_options, reference_request
from hybridd.place.plan import plan
from hybridd.place.train import place_training, train_plan
from hybridd.probe.gguf_file import read_gguf_header
from hybridd.probe.gpus import devices_from_snapshot
from hybridd.probe.hardware_profiles import load_hardware_profile
from hybridd.probe.model_profiles import list_profiles, load_profile, profile_header
from hybridd.validate import JSON, TOML, Reader, field_names


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
    train: str | None = None  # lora, qlora or full: plan a fine-tune instead of inference
    seq: int | None = None
    batch: int | None = None
    rank: int | None = None
    dataset_tokens: int | None = None
    prompt_tokens: int | None = None  # the reference request placement is judged on (default: half the ctx)
    max_tokens: int | None = None  # its completion (default: 1024, at most a quarter of the ctx)
    # The engine that runs it (llama-server reserves logits for one output a slot, llama-cpp-python for n_batch),
    # unless a configured model names its own; None: llama-cpp-python's reservation (the larger).
    engine: str | None = None


def plan_request_from_json(body: Mapping[str, Any]) -> PlanRequest:
    """Validate a POST /hybridd/v1/plan body; BadRequest names the field."""
    if not isinstance(body, Mapping):
        raise BadRequest("request body must be a JSON object")
    fields = Reader(dict(body), BadRequest, JSON).table((*field_names(PlanRequest), "kv_type"))
    kv = fields.at("kv_type").of(str, None)
    request = PlanRequest(
        model=fields.at("model").of(str), quant=fields.at("quant").of(str, None), ctx=fields.at("ctx").of(int, None),
        type_k=fields.at("type_k").of(str, None) or kv, type_v=fields.at("type_v").of(str, None) or kv,
        slots=fields.at("slots").of(int, None) or 1, flash_attn=fields.at("flash_attn").of(bool, None),
        hardware=fields.at("hardware").of(str, None),
        peers=tuple(peer.of(str) for peer in fields.at("peers").items(optional=True)),
        train=fields.at("train").of(str, None), seq=fields.at("seq").of(int, None),
        batch=fields.at("batch").of(int, None), rank=fields.at("rank").of(int, None),
        dataset_tokens=fields.at("dataset_tokens").of(int, None),
        prompt_tokens=fields.at("prompt_tokens").of(int, None), max_tokens=fields.at("max_tokens").of(int, None),
        engine=fields.at("engine").of(str, None),
    )
    check_request(request)
    return request


# Settings are named as the CLI's flags are, and None is a setting left out: `type_k: unknown cache type 'q9'`.
_SETTING_WORDS = replace(TOML, quote=repr, null_is_absent=True)


def check_request(request: PlanRequest) -> None:
    """Reject impossible settings with a message naming the field."""
    settings = Reader(vars(request), BadRequest, _SETTING_WORDS).table()
    for name in ("type_k", "type_v"):
        settings.at(name).choice(tuple(sorted(KV_CACHE_TYPES)), None, what="cache type")
    settings.at("ctx").integer(None, low=1, high=16 * 1024 * 1024)
    settings.at("slots").integer(low=1, high=256)
    settings.at("train").choice(tuple(m.value for m in TrainMethod), None, what="training method")
    settings.at("seq").integer(None, low=1, high=1024 * 1024)
    settings.at("batch").integer(None, low=1, high=4096)
    settings.at("rank").integer(None, low=1, high=4096)
    settings.at("dataset_tokens").integer(None, low=1, high=10**15)
    settings.at("prompt_tokens").integer(None, low=0, high=16 * 1024 * 1024)
    settings.at("engine").choice(MANAGED_KINDS, None, what="engine")
    settings.at("max_tokens").integer(None, low=1, high=16 * 1024 * 1024)
    if request.train is None:
        for name in ("seq", "batch", "rank", "dataset_tokens"):
            if getattr(request, name) is not None:
                raise BadRequest(f"{name}: only with train (lora, qlora or full)")
    elif request.ctx is not None:
        raise BadRequest("ctx: not with train; a fine-tune's length is seq")
    if request.train is not None:
        for name in ("prompt_tokens", "max_tokens"):
            if getattr(request, name) is not None:
                raise BadRequest(f"{name}: not with train; a fine-tune has no reference request")
        if request.engine is not None:
            raise BadRequest("engine: not with train; a fine-tune runs in a training job, not an inference engine")


def find_header(name: str, quant: str | None, catalog: Catalog | None) -> tuple[GgufHeader, dict[str, Any]]:
    """The model's header and the run settings its config implies (empty for files and profiles)."""
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
                        "flash_attn": entry.flash_attn, "engine": entry.engine,
                        "engine_named": not entry.engine_implied, "every_row": entry.outputs_every_row}
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
        node = load_hardware_profile(hardware).hardware()
        return list(node.devices), node.ram_bytes, f"hardware profile {hardware}", node
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
    if request.train is not None:
        return training_plan(request, TrainMethod(request.train), spec, header)
    ctx = request.ctx or configured.get("ctx") or DEFAULT_CTX
    flash = request.flash_attn if request.flash_attn is not None else configured.get("flash_attn", True)
    # as `hybridd serve --engine`: the engine of a model whose config names none
    engine = configured["engine"] if configured.get("engine_named") else request.engine or configured.get("engine")
    outputs = engine_outputs(engine, request.slots, configured.get("every_row", False))
    settings = RunSettings(
        ctx=ctx, n_seq=request.slots, flash_attn=flash, n_outputs=outputs,
        type_k=request.type_k or configured.get("type_k", "f16"),
        type_v=request.type_v or configured.get("type_v", "f16"),
    )
    if settings.type_v not in ("f16", "f32", "bf16") and not flash:
        raise BadRequest(f"type_v: a quantized V cache ('{settings.type_v}') needs flash attention")
    devices, host_free, source, node = find_devices(request.hardware)
    result = plan(spec, settings, devices, host_free)
    result["model"] = result.get("model") or request.model
    result["hardware"] = source
    result["engine"] = engine  # None: not known, planned with llama-cpp-python's buffers
    result["file_bytes"] = header.file_bytes
    prompt, completion = reference_request(ctx, request.prompt_tokens, request.max_tokens)
    if prompt + completion > ctx:
        raise BadRequest(f"prompt_tokens + max_tokens: {prompt} + {completion} tokens do not fit the context "
                         f"({ctx}); raise ctx or ask for fewer tokens")
    result.update(placement_options(spec, settings, node, request.peers, prompt, completion))
    return result


def training_plan(request: PlanRequest, method: TrainMethod, spec: ModelSpec, header: GgufHeader) -> dict[str, Any]:
    """The `--train` plan: the fine-tune's memory, and where it runs (this node or the --peer profiles)."""
    settings = TrainSettings(method, seq=request.seq or DEFAULT_SEQ,
                             batch=request.batch or DEFAULT_BATCH, rank=request.rank or DEFAULT_RANK)
    estimate = estimate_training(spec, header.tensors, settings)
    _, _, source, node = find_devices(request.hardware)
    peers = [load_hardware_profile(name).hardware() for name in request.peers]
    placement = place_training(spec, estimate, node, peers, request.dataset_tokens)
    result = train_plan(spec, estimate, placement, request.dataset_tokens)
    result["model"] = result.get("model") or request.model
    result["hardware"] = source
    return result


def placement_options(spec: ModelSpec, settings: RunSettings, node: Hardware, peers: Sequence[str],
                      prompt_tokens: int | None = None, max_tokens: int | None = None) -> dict[str, Any]:
    """Where a reference request would run (this node or the --peer profiles) and each option's speed."""
    return plan_options(spec, settings, node, [load_hardware_profile(name).hardware() for name in peers],
                        prompt_tokens=prompt_tokens, max_tokens=max_tokens)
