"""Fit over heterogeneous GPUs, partial offload, --n-cpu-moe, unified memory; the plan dict and its table."""

from __future__ import annotations

import json

import pytest

from hybridd.model.memory import RunSettings, estimate_memory
from hybridd.model.spec import ModelSpec, model_spec
from hybridd.place.devices import Device
from hybridd.place.fit import fit_model
from hybridd.place.plan import plan, render_plan_table
from hybridd.probe.model_profiles import load_profile, profile_header

GIB = 1024**3
DESKTOP = [Device("RTX 4090", 24 * GIB, 23 * GIB, reserve_bytes=GIB // 2),
           Device("RTX 5070 Ti", 16 * GIB, 15 * GIB)]


def _profile(name: str, quant: str | None = None) -> ModelSpec:
    header = profile_header(load_profile(name), quant)
    return model_spec(header.metadata, header.tensors)


def test_device_usable_bytes_subtract_reserve() -> None:
    assert Device("g", 10, 8, reserve_bytes=3).usable_bytes == 5
    assert Device("g", 10, 2, reserve_bytes=3).usable_bytes == 0
    with pytest.raises(ValueError):
        Device("g", -1, 0)


def test_small_model_fits_and_splits_proportionally() -> None:
    est = estimate_memory(_profile("glm-4.7-flash", "Q4_K_M"), RunSettings(ctx=32768))
    fit = fit_model(est, DESKTOP, host_ram_free=32 * GIB)
    assert fit.fits and fit.offload_layers == 0 and fit.n_cpu_moe == 0
    big, small = fit.devices
    assert len(big.layers) + len(small.layers) == 47
    assert len(big.layers) > len(small.layers)  # more free memory, more layers
    assert big.layers[-1] < small.layers[0]  # contiguous, in device order
    assert all(d.bytes_free >= 0 for d in fit.devices)
    assert fit.reason.startswith("fits")


def test_dense_model_too_big_offloads_first_layers() -> None:
    est = estimate_memory(_profile("llama-3.1-70b", "Q4_K_M"), RunSettings(ctx=32768))
    fit = fit_model(est, DESKTOP, host_ram_free=64 * GIB)
    assert not fit.fits and fit.runs
    assert 0 < fit.offload_layers < 80
    placed_layers = sorted(i for d in fit.devices for i in d.layers)
    assert placed_layers == list(range(fit.offload_layers, 80))  # llama.cpp -ngl offloads the last layers
    assert f"{fit.offload_layers} layers in RAM" in fit.reason


def test_moe_model_too_big_keeps_experts_in_ram_first() -> None:
    est = estimate_memory(_profile("gpt-oss-120b"), RunSettings(ctx=32768))
    fit = fit_model(est, DESKTOP, host_ram_free=96 * GIB)
    assert not fit.fits and fit.runs
    assert fit.n_cpu_moe > 0 and fit.offload_layers == 0
    assert fit.host_bytes > 20 * GIB


def test_does_not_fit_anywhere() -> None:
    est = estimate_memory(_profile("qwen3.5-397b-a17b", "Q8_0"), RunSettings(ctx=32768))
    fit = fit_model(est, DESKTOP, host_ram_free=64 * GIB)
    assert not fit.fits and not fit.runs
    assert fit.reason.startswith("does not fit")


def test_unified_memory_is_one_pool() -> None:
    spark = [Device("GB10", 128 * GIB, 110 * GIB, unified=True, reserve_bytes=4 * GIB)]
    est = estimate_memory(_profile("gpt-oss-120b"), RunSettings(ctx=131072))
    fit = fit_model(est, spark, host_ram_free=110 * GIB)
    assert fit.fits
    # host-side buffers are charged to the same pool, not to a second "RAM"
    assert fit.host_bytes == 0
    assert fit.devices[0].bytes_placed >= est.weights_bytes


def test_no_gpu_runs_from_ram() -> None:
    est = estimate_memory(_profile("llama-3.1-8b"), RunSettings(ctx=8192, backend="cpu"))
    fit = fit_model(est, [], host_ram_free=32 * GIB)
    assert not fit.fits and fit.runs and fit.offload_layers == 32


def test_display_reserve_can_push_a_layer_off() -> None:
    est = estimate_memory(_profile("qwen3-32b", "Q8_0"), RunSettings(ctx=16384))
    need = est.total_bytes - est.token_embd_bytes - est.output_buffer_bytes
    roomy = [Device("A6000", 48 * GIB, need + 2 * GIB)]
    tight = [Device("A6000", 48 * GIB, need + 2 * GIB, reserve_bytes=3 * GIB)]
    assert fit_model(est, roomy, 64 * GIB).fits
    assert not fit_model(est, tight, 64 * GIB).fits


def test_plan_dict_has_the_contract_keys_and_is_json() -> None:
    p = plan(_profile("glm-4.7-flash", "Q8_0"), RunSettings(ctx=114688, type_k="q8_0", type_v="q8_0"),
             DESKTOP, 64 * GIB)
    for key in ("weights_bytes", "kv_bytes", "recurrent_bytes", "compute_bytes", "reserve_bytes", "total_bytes",
                "ctx", "fits", "offload_layers", "devices", "model", "architecture", "type_k", "type_v", "parts"):
        assert key in p
    assert p["architecture"] == "deepseek2" and p["type_k"] == "q8_0"
    assert p["ctx"] == 114688
    assert {"name", "bytes_placed", "bytes_free"} <= set(p["devices"][0])
    assert len(p["parts"]["layers"]) == 47
    json.dumps(p)


def test_table_is_readable() -> None:
    p = plan(_profile("llama-3.1-70b", "Q4_K_M"), RunSettings(ctx=32768), DESKTOP, 64 * GIB)
    table = render_plan_table(p)
    assert "KV cache" in table and "weights" in table and "RTX 4090" in table
    assert f"{p['offload_layers']} layers in RAM" in table
    fits = render_plan_table(plan(_profile("llama-3.1-8b"), RunSettings(ctx=8192), DESKTOP, 64 * GIB))
    assert "\n  fits: " in fits
    nothing = render_plan_table(plan(_profile("qwen3.5-397b-a17b", "Q8_0"), RunSettings(), DESKTOP, GIB))
    assert "does not fit" in nothing


def test_a_layer_split_gives_each_gpu_its_own_compute_buffer_as_llama_cpp_sizes_it() -> None:
    # GLM-4.7-Flash Q8_0 at 64k with a q8_0 cache on the two desktop GPUs: every layer offloaded over two GPUs turns
    # on pipeline parallelism, so each GPU keeps four copies of the 64 MiB f16 KQ mask; only the GPU with the
    # output layer holds the logits (154880 x 512 f32 = 302.5 MiB); each holds the F16 copy flash attention makes of
    # the q8_0 K cache (576 x 65536 x 2 bytes = 72 MiB, MLA's V being a view of K)
    est = estimate_memory(_profile("glm-4.7-flash", "Q8_0"),
                          RunSettings(ctx=65536, type_k="q8_0", type_v="q8_0"))
    mib = 1024**2
    assert est.graph_input_bytes == 65536 * 512 * 2  # the f16 KQ mask
    assert est.fa_copy_bytes == 576 * 65536 * 2
    assert est.logits_bytes == (154880 + 2048) * 512 * 4
    fit = fit_model(est, DESKTOP, 64 * GIB)
    first, last = fit.devices
    assert fit.fits and first.layers and last.layers
    assert first.compute_bytes == est.device_compute_bytes(4, holds_output=False)
    assert last.compute_bytes == est.device_compute_bytes(4, holds_output=True)
    assert first.compute_bytes >= 4 * 64 * mib + 72 * mib
    assert last.compute_bytes >= 4 * 64 * mib + est.logits_bytes
    assert first.runtime_bytes == last.runtime_bytes == est.runtime_reserve_bytes
    assert first.display_bytes == GIB // 2 and last.display_bytes == 0
    for d in fit.devices:
        assert d.bytes_placed == d.weights_bytes + d.kv_bytes + d.recurrent_bytes + d.compute_bytes + d.runtime_bytes
    # one GPU, or layers left in RAM: no pipeline parallelism, one copy of the inputs
    single = fit_model(est, [Device("RTX PRO 6000", 96 * GIB, 95 * GIB)], 64 * GIB)
    assert single.devices[0].compute_bytes == est.device_compute_bytes(1, holds_output=True)


def test_the_reason_counts_what_the_gpus_really_hold() -> None:
    est = estimate_memory(_profile("glm-4.7-flash", "Q8_0"), RunSettings(ctx=65536, type_k="q8_0", type_v="q8_0"))
    fit = fit_model(est, DESKTOP, 64 * GIB)
    placed = sum(d.bytes_placed for d in fit.devices)
    spare = sum(d.bytes_free for d in fit.devices)
    assert fit.reason == (f"fits: needs {placed / GIB:.1f} GiB at 65536 ctx; GPUs have {(placed + spare) / GIB:.1f} "
                          f"GiB usable ({spare / GIB:.1f} GiB to spare)")


def test_the_logits_are_charged_to_the_last_gpu_that_can_hold_layers() -> None:
    # the 5070 Ti is full (another engine): GLM-4.7-Flash Q4_K_M at 4k goes wholly on the 4090, logits and all
    est = estimate_memory(_profile("glm-4.7-flash", "Q4_K_M"), RunSettings(ctx=4096))
    need = est.layer_weight_bytes + est.output_weight_bytes + est.kv_bytes + est.runtime_reserve_bytes
    need += est.device_compute_bytes(4, holds_output=True)
    gpus = [Device("RTX 4090", 24 * GIB, need + GIB // 8), Device("RTX 5070 Ti", 16 * GIB, 0)]
    fit = fit_model(est, gpus, 64 * GIB)
    assert fit.fits and len(fit.devices[0].layers) == len(est.layers) and not fit.devices[1].layers
    assert fit.devices[0].compute_bytes == est.device_compute_bytes(4, holds_output=True)
