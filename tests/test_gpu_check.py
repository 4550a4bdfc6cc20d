"""The pieces of bench/gpu_check.py that run without a GPU: twins, log parsing, the profile and bandwidth labels.

The whole script is exercised by `bench/gpu_check.sh --dry-run` (bench/results/gpu_check-dryrun.json); these keep
its pure parts from drifting while nobody has a GPU to run it on.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import gguf
import pytest

from hybridd.model.ggml_types import ggml_type
from hybridd.model.header import TensorInfo
from hybridd.model.memory import MIB, RunSettings, engine_outputs, estimate_memory
from hybridd.model.spec import model_spec
from hybridd.place.fit import fit_model
from hybridd.place.speed import PLAIN_CONSTANTS, DeviceClass
from hybridd.probe.gguf_file import read_gguf_header
from hybridd.probe.hardware_profiles import load_hardware_profile
from hybridd.probe.model_profiles import load_profile

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str) -> ModuleType:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def twins() -> ModuleType:
    return _load("gpu_check_twins")


@pytest.fixture(scope="module")
def check() -> ModuleType:
    return _load("gpu_check")


@pytest.mark.parametrize("scheme", ["Q8_0", "Q4_K_M"])
def test_a_twin_has_the_profile_shapes_in_real_quant_types_and_finite_scales(
        twins: ModuleType, tmp_path: Path, scheme: str) -> None:
    metadata = twins.shrink(load_profile("llama-3.2-3b").metadata, layers=1, vocab=512)
    written = twins.write_twin(tmp_path / "twin.gguf", metadata, scheme)

    header = read_gguf_header(written.path)
    assert header.metadata["llama.embedding_length"] == 3072 and header.metadata["llama.block_count"] == 1
    reader = gguf.GGUFReader(written.path)
    types = {t.name: t.tensor_type for t in reader.tensors}
    main = gguf.GGMLQuantizationType.Q8_0 if scheme == "Q8_0" else gguf.GGMLQuantizationType.Q4_K
    assert types["blk.0.ffn_down.weight"] == main
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == 512
    # every block's f16 scale is the small finite value written, never random bits
    q = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    block_bytes = gguf.GGML_QUANT_SIZES[main][1]
    scales = q.data.reshape(-1, block_bytes)[:, :2].copy().view("<f2")
    assert (scales > 0).all() and (scales < 1e-3).all()
    norm = next(t for t in reader.tensors if t.name == "blk.0.attn_norm.weight")
    assert (norm.data == 1.0).all()
    # the plan reads what was written: its weights are the file's tensor bytes
    spec = model_spec(header.metadata, header.tensors)
    est = estimate_memory(spec, RunSettings(ctx=1024))
    assert est.weights_bytes == sum(t.n_bytes for t in header.tensors)


def test_llama_cpp_buffer_lines_and_the_breakdown_are_read(check: ModuleType, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text(
        "0.00.423.055 I load_tensors:        CUDA0 model buffer size =  3190.20 MiB\n"
        "0.00.423.057 I load_tensors:   CPU_Mapped model buffer size =   394.12 MiB\n"
        "0.00.787.943 I llama_context:  CUDA_Host  output buffer size =     0.49 MiB\n"
        "0.00.788.004 I llama_kv_cache:      CUDA0 KV buffer size =  3584.00 MiB\n"
        "0.00.890.993 I sched_reserve:      CUDA0 compute buffer size =   256.50 MiB\n"
        "0.00.890.995 I sched_reserve:  CUDA_Host compute buffer size =    70.01 MiB\n"
        "0.01.792.666 I common_memory_breakdown_print: | memory breakdown [MiB] | total free self model context |\n"
        "0.01.792.704 I common_memory_breakdown_print: |   - CUDA0 (H100 80GB HBM3) | 81559 = 74000 + (7030 = ...\n")
    found = check.logged_buffers(log)
    assert found["buffers_mib"] == {"CUDA0 model": 3190.2, "CPU_Mapped model": 394.12, "CUDA_Host output": 0.49,
                                    "CUDA0 KV": 3584.0, "CUDA0 compute": 256.5, "CUDA_Host compute": 70.01}
    assert found["breakdown"][1].startswith("|   - CUDA0 (H100 80GB HBM3) | 81559")


def test_the_gpu_names_its_profile_and_its_memory_a_class(check: ModuleType) -> None:
    assert check.profile_for([{"name": "NVIDIA H100 80GB HBM3"}]) == "h100-sxm"
    assert check.profile_for([{"name": "NVIDIA H200"}]) == "h200-sxm"
    assert check.profile_for([]) == "h100-sxm"  # the dry run predicts for the GPU it prepares for
    assert check.bandwidth_class(3.35e12, False) == "HBM class (3.35 TB/s)"
    assert check.bandwidth_class(1.008e12, False) == "GDDR class (1.01 TB/s)"
    assert check.bandwidth_class(273e9, True) == "unified LPDDR class (0.27 TB/s)"
    assert check.bandwidth_class(None, False).startswith("unknown")


H200_RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "gpu_check-NVIDIA-H200.json"


def _h200_runs() -> list[tuple[str, str, dict[str, object]]]:
    body = json.loads(H200_RESULTS.read_text())
    return [(t["model_profile"], t["quant"], run) for t in body["twins"] for run in t["runs"]]


@pytest.mark.parametrize(("profile", "scheme", "run"), _h200_runs(),
                         ids=lambda v: f"{v['ctx']}" if isinstance(v, dict) else str(v))
def test_the_plan_matches_the_cuda_buffers_llama_cpp_logged_on_the_h200(
        twins: ModuleType, profile: str, scheme: str, run: dict[str, Any]) -> None:
    # bench/gpu_check.sh on a lent H200: each twin loaded wholly on the GPU by llama-server. The plan, computed
    # here from the twin's exact tensors, against llama.cpp's own buffer sizes and what NVML says the process holds.
    metadata = load_profile(profile).metadata
    tensors = [TensorInfo(name, shape, ggml_type(qtype.name)) for name, shape, qtype, _ in
               twins.twin_tensors(metadata, scheme)]
    spec = model_spec(metadata, tensors)
    # llama-server, one slot: logits reserved for one output row (engine_outputs)
    est = estimate_memory(spec, RunSettings(ctx=run["ctx"], flash_attn=True, type_k="f16", type_v="f16",
                                            n_outputs=engine_outputs("llama-server", 1)))
    hw = load_hardware_profile("h200-sxm").hardware()
    fit = fit_model(est, list(hw.devices), hw.ram_bytes)
    assert fit.fits
    (gpu,) = fit.devices
    logged = run["llama_cpp"]["buffers_mib"]
    # weights (the token embeddings stay in host memory) and the KV cache: to the MiB
    assert gpu.weights_bytes / MIB == pytest.approx(logged["CUDA0 model"], abs=1.0)
    assert gpu.kv_bytes / MIB == pytest.approx(logged["CUDA0 KV"], abs=1.0)
    # the compute buffer (masks, residual stream, the largest layer's working set, one row of logits): within 10%
    assert gpu.compute_bytes / MIB == pytest.approx(logged["CUDA0 compute"], rel=0.10)
    # at llama-cpp-python's n_outputs_max = n_batch it would hold 512 rows of logits: 174-245 MiB more
    at_batch = estimate_memory(spec, RunSettings(ctx=run["ctx"], flash_attn=True, type_k="f16", type_v="f16"))
    assert at_batch.compute_bytes - est.compute_bytes > 150 * MIB
    # what else the process holds (CUDA context, kernels, cuBLAS workspace, pool): 588-596 MiB on the H200,
    # against the 736 MiB charged for a 128-SM GPU
    held = run["memory"]["process_bytes_loaded"] / MIB
    rest = held - logged["CUDA0 model"] - logged["CUDA0 KV"] - logged["CUDA0 compute"]
    assert 0.75 * gpu.runtime_bytes / MIB <= rest <= gpu.runtime_bytes / MIB
    # so the plan's total is never below what the process holds, and within 6% above it (1% for the big ones)
    assert held <= gpu.bytes_placed / MIB <= held * 1.06


def test_the_kernel_aware_rule_fits_the_h200_points_one_attention_cost_misses() -> None:
    # bench/kernel_rule.py: one attention cost for all layers (the plain rule, the baseline) misses six H200
    # points leave-one-out; following llama.cpp's vec / stream-k MMA kernel choice leaves one, and freeing the
    # routed experts' matrix cost none. The constants are physical: MMA a fraction of vec's cost per cached token
    # (the cache read once a KV head, not once a query head), about 0.1 us a stream-k partial.
    out = _load("kernel_rule").compare()
    plain, aware, in_use = (out[rule] for rule in _load("kernel_rule").RULES)
    assert (len(plain["misses"]), len(aware["misses"]), len(in_use["misses"])) == (6, 1, 0)
    assert in_use["rms_error"] < plain["rms_error"]
    const = in_use["constants"]
    assert const["mma_s"] < const["attend_s"] / 3 and const["attention"] == 0
    assert 0.05e-6 < const["partial_s"] < 0.2e-6
    # an HBM GPU that does not say its kernels predicts with the plain rule's fit (speed.PLAIN_CONSTANTS)
    pinned = PLAIN_CONSTANTS[DeviceClass.HBM]
    for name in ("efficiency", "tensor_s", "attention", "attend_s", "split_s"):
        assert getattr(pinned, name) == pytest.approx(plain["constants"][name], rel=0.02, abs=1e-12), name
