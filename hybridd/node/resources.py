"""What this node and its peers have to place requests on: a memory budget from config, a hardware profile,
or the probe (NVML for GPUs, psutil for RAM; a CPU-only node places models in system RAM)."""

from __future__ import annotations

import logging
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from hybridd.config import Config, PeerConfig
from hybridd.engine.llamaserver import find_llama_server
from hybridd.place.devices import Device
from hybridd.place.hardware import Hardware
from hybridd.probe.engine_builds import EngineBuild, engine_warnings, plans_cpu_only, probe_builds
from hybridd.probe.gpus import GpuProbe, MachineSnapshot, devices_from_snapshot
from hybridd.probe.hardware_profiles import load_hardware_profile
from hybridd.probe.host import HostProbe

log = logging.getLogger("hybridd")


@dataclass(frozen=True)
class Peer:
    """A configured peer with the hardware it runs on (from its profile)."""

    config: PeerConfig
    hardware: Hardware


def node_name(config: Config) -> str:
    """This node's name: node.name, else the host name."""
    return config.node.name or socket.gethostname().split(".")[0] or "local"


def engine_builds_in_use(config: Config) -> tuple[EngineBuild, ...]:
    """What the engine builds the config's models use can offload to (each asked in a child process: blocking)."""
    kinds = {config.engine.kind, *(m.engine for m in config.models if m.path is not None)}
    binary = find_llama_server(config.engine.llama_server) if "llama-server" in kinds else None
    return tuple(probe_builds(kinds, config.engine.python or sys.executable, binary))


def local_hardware(config: Config, builds: Callable[[], Sequence[EngineBuild]] | None = None) -> Hardware:
    """This node's hardware now; raises ConfigError for an unknown hardware profile. `builds`: asks the engine
    builds in use what they offload to (only when the probe finds GPUs), so that GPUs no build can use are not
    planned on."""
    node = config.node
    name = node_name(config)
    if node.devices:
        devices = tuple(Device(d.name, d.memory_bytes, d.memory_bytes, d.unified, 0, d.bandwidth_bytes_s,
                               d.compute_capability, d.sm_count) for d in node.devices)
        ram = node.ram_bytes if node.ram_bytes is not None else HostProbe().memory().available_bytes
        return Hardware(name, devices, 0 if any(d.unified for d in devices) else ram, node.ram_bandwidth_bytes_s,
                        node.disk_read_bytes_s)
    if node.hardware:
        return load_hardware_profile(node.hardware).hardware(disk_read_bytes_s=node.disk_read_bytes_s)
    snapshot = probe_machine()
    return hardware_from_snapshot(config, snapshot, builds() if builds is not None and snapshot.gpus else ())


def probe_machine() -> MachineSnapshot:
    """This machine's GPUs and RAM now, as NVML and psutil see them."""
    probe = GpuProbe.for_this_machine()
    try:
        snapshot = probe.snapshot()
    finally:
        probe.close()
    for note in snapshot.notes:
        log.info("probe: %s", note)
    return snapshot


def hardware_from_snapshot(config: Config, snapshot: MachineSnapshot, builds: Sequence[EngineBuild] = ()) -> Hardware:
    """The probed machine as placement hardware; with no GPU, system RAM is the one pool. GPUs that no engine build
    in use can offload to are left out (a CPU build plans as CPU-only), with a note saying so."""
    node = config.node
    name = node_name(config)
    notes = tuple(engine_warnings(builds, len(snapshot.gpus)))
    if plans_cpu_only(builds, len(snapshot.gpus)):
        # No engine can use them: planning on the GPUs would promise speeds no engine delivers.
        snapshot = replace(snapshot, gpus=(), unified=False)
    gpus = tuple(devices_from_snapshot(snapshot, display_reserve_bytes=node.display_reserve_bytes))
    if gpus:
        ram = 0 if snapshot.unified else snapshot.host_available_bytes
        return Hardware(name, gpus, ram, node.ram_bandwidth_bytes_s, node.disk_read_bytes_s, notes=notes)
    # No GPU: llama.cpp runs on the CPU and the model lives in system RAM, which is then the one pool.
    cpu = Device("CPU (system RAM)", snapshot.host_total_bytes, snapshot.host_available_bytes, unified=True,
                 bandwidth_bytes_s=node.ram_bandwidth_bytes_s)
    return Hardware(name, (cpu,), 0, node.ram_bandwidth_bytes_s, node.disk_read_bytes_s, notes=notes)


def configured_peers(config: Config) -> list[Peer]:
    """The [[peers]] with their hardware profiles loaded; raises ConfigError for an unknown profile."""
    return [Peer(p, load_hardware_profile(p.hardware).hardware()) for p in config.peers]
