"""An engine build that cannot use the GPUs the probe sees: placement plans the node as CPU-only and says why, in
status and in each local placement reason. A fake NVML snapshot of two GPUs; the real tiny engine."""

from __future__ import annotations

from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestServer

from hybridd.api.app import make_app
from hybridd.config import Config, ModelEntry
from hybridd.node.catalog import Catalog
from hybridd.node.resources import hardware_from_snapshot
from hybridd.probe.engine_builds import LLAMA_CPP_PYTHON, EngineBuild
from hybridd.probe.gpus import GpuInfo, MachineSnapshot

GIB = 2**30
TWO_GPUS = MachineSnapshot(
    gpus=(GpuInfo(0, "NVIDIA GeForce RTX 4090", "GPU-0", 24 * GIB, 23 * GIB, GIB, False, bandwidth_bytes_s=1.0e12),
          GpuInfo(1, "NVIDIA GeForce RTX 5070 Ti", "GPU-1", 16 * GIB, 15 * GIB, GIB, False,
                  bandwidth_bytes_s=8.96e11)),
    host_total_bytes=64 * GIB, host_available_bytes=48 * GIB, unified=False, taken_at=0.0)
CPU_BUILD = EngineBuild(LLAMA_CPP_PYTHON, "/usr/bin/python3", installed=True, version="0.3.36", gpu_offload=False)
CUDA_BUILD = EngineBuild(LLAMA_CPP_PYTHON, "/usr/bin/python3", installed=True, version="0.3.36", gpu_offload=True)


def test_a_cpu_build_plans_the_node_as_cpu_only_and_says_so() -> None:
    hardware = hardware_from_snapshot(Config(), TWO_GPUS, (CPU_BUILD,))
    assert [d.name for d in hardware.devices] == ["CPU (system RAM)"]
    assert hardware.notes == ("engine llama-cpp-python is a CPU build: 2 GPUs unused",)
    with_gpus = hardware_from_snapshot(Config(), TWO_GPUS, (CUDA_BUILD,))
    assert len(with_gpus.devices) == 2 and with_gpus.notes == ()


async def test_status_and_the_placement_reason_carry_the_warning(tiny_model: Path) -> None:
    hardware = hardware_from_snapshot(Config(), TWO_GPUS, (CPU_BUILD,))
    catalog = Catalog((ModelEntry(name="tiny", path=tiny_model, ctx=512),))
    server = TestServer(make_app(Config(), catalog, hardware=hardware), host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(server.make_url("/hybridd/v1/status")) as reply:
                assert (await reply.json())["warnings"] == [
                    "engine llama-cpp-python is a CPU build: 2 GPUs unused"]
            body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
            async with http.post(server.make_url("/v1/completions"), json=body) as reply:
                assert reply.status == 200
                assert reply.headers["x-hybridd-placement"] == "local"
                assert "engine llama-cpp-python is a CPU build: 2 GPUs unused" in reply.headers["x-hybridd-reason"]
    finally:
        await server.close()
