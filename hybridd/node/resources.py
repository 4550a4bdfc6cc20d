"""What this node and its peers have to place requests on: a memory budget from config, a hardware profile,
or the probe (NVML for GPUs, psutil for RAM; a CPU-only node places models in system RAM)."""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

from hybridd.config import Config, PeerConfig
from hybridd.place.devices import Device
from hybridd.place.hardware import Hardware
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


def local_hardware(config: Config) -> Hardware:
    """This node's hardware now; raises ConfigError for an unknown hardware profile."""
    node = config.node
    name = node_name(config)
    if node.devices:
        devices = tuple(Device(d.name, d.memory_bytes, d.memory_bytes, d.unified, 0, d.bandwidth_bytes_s)
                        for d in node.devices)
        ram = node.ram_bytes if node.ram_bytes is not None else HostProbe().memory().available_bytes
        return Hardware(name, devices, 0 if any(d.unified for d in devices) else ram, node.ram_bandwidth_bytes_s,
                        node.disk_read_bytes_s)
    if node.hardware:
        return load_hardware_profile(node.hardware).hardware(disk_read_bytes_s=node.disk_read_bytes_s)
    return hardware_from_snapshot(config, probe_machine())


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


def hardware_from_snapshot(config: Config, snapshot: MachineSnapshot) -> Hardware:
    """The probed machine as placement hardware; with no GPU, system RAM is the one pool."""
    node = config.node
    name = node_name(config)
    gpus = tuple(devices_from_snapshot(snapshot, display_reserve_bytes=node.display_reserve_bytes))
    if gpus:
        ram = 0 if snapshot.unified else snapshot.host_available_bytes
        return Hardware(name, gpus, ram, node.ram_bandwidth_bytes_s, node.disk_read_bytes_s)
    # No GPU: llama.cpp runs on the CPU and the model lives in system RAM, which is then the one pool.
    cpu = Device("CPU (system RAM)", snapshot.host_total_bytes, snapshot.host_available_bytes, unified=True,
                 bandwidth_bytes_s=node.ram_bandwidth_bytes_s)
    return Hardware(name, (cpu,), 0, node.ram_bandwidth_bytes_s, node.disk_read_bytes_s)


def configured_peers(config: Config) -> list[Peer]:
    """The [[peers]] with their hardware profiles loaded; raises ConfigError for an unknown profile."""
    return [Peer(p, load_hardware_profile(p.hardware).hardware()) for p in config.peers]
