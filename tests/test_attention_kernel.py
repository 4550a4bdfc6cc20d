"""The attention kernel llama.cpp's CUDA backend runs for a decoded token, and what the speed model makes of it."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from hybridd.model.memory import RunSettings, estimate_memory
from hybridd.model.spec import LayerSpec, ModelSpec, model_spec
from hybridd.place.attention import MMA_FROM_DEPTH, VEC, decode_kernel
from hybridd.place.fit import fit_model
from hybridd.place.hardware import Hardware
from hybridd.place.speed import SpeedModel, speed_model
from hybridd.probe.hardware_profiles import load_hardware_profile
from hybridd.probe.model_profiles import load_profile, profile_header

HOPPER, H200_SMS = 90, 132


def spec_of(name: str, quant: str | None = None) -> ModelSpec:
    header = profile_header(load_profile(name), quant)
    return model_spec(header.metadata, header.tensors)


def first_attention(name: str, quant: str | None = None) -> LayerSpec:
    return spec_of(name, quant).attention_layers[0]


def test_mla_runs_the_mma_kernel_with_stream_k_from_the_first_token() -> None:
    # GLM-4.7-Flash: 20 query heads on one 576-wide latent; tiles of 16 heads -> 2 output tiles; 4 blocks an SM
    kernel = decode_kernel(first_attention("glm-4.7-flash", "Q4_K_M"), HOPPER, H200_SMS)
    assert kernel is not None
    assert (kernel.mma_from, kernel.tile_tokens, kernel.max_partials) == (0.0, 32, H200_SMS * 4 // 2)
    assert kernel.partials_cap == 32 * 264  # the blocks fill the H200 at about 8.4k cached tokens


def test_gqa_over_4_moves_to_the_mma_kernel_at_an_8192_token_view_on_ada_and_newer() -> None:
    qwen3 = first_attention("qwen3-coder-30b-a3b", "Q4_K_M")  # 32 query heads over 4 KV heads
    kernel = decode_kernel(qwen3, HOPPER, H200_SMS)
    assert kernel is not None
    assert (kernel.mma_from, kernel.tile_tokens, kernel.max_partials) == (MMA_FROM_DEPTH, 128, H200_SMS * 2 // 4)
    assert MMA_FROM_DEPTH == 8192 - 256  # the cache view is padded to 256 cells
    assert decode_kernel(qwen3, 89, 128) == replace(kernel, max_partials=128 * 2 // 4)  # RTX 4090
    # Ampere runs the MMA kernel for any GQA layer; a quantized cache keeps the vec kernel
    ampere = decode_kernel(qwen3, 86, 84)
    assert ampere is not None and ampere.mma_from == 0
    assert decode_kernel(qwen3, HOPPER, H200_SMS, "q8_0") == VEC


def test_gqa_of_4_or_less_stays_in_the_vec_kernel() -> None:
    for name, quant in (("llama-3.2-3b", "Q8_0"), ("llama-3.1-8b", "Q4_K_M")):  # 3 and 4 query heads a KV head
        kernel = decode_kernel(first_attention(name, quant), HOPPER, H200_SMS)
        assert kernel == VEC and kernel.mma_from == math.inf


def test_an_unknown_gpu_has_no_kernel_rule() -> None:
    layer = first_attention("glm-4.7-flash", "Q4_K_M")
    assert decode_kernel(layer, 0, H200_SMS) is None
    assert decode_kernel(layer, HOPPER, 0) is None
    assert decode_kernel(layer, 61, 30) is None  # Pascal: no tensor-core kernel


@pytest.fixture(scope="module")
def h200() -> Hardware:
    return load_hardware_profile("h200-sxm").hardware()


def model_on(hw: Hardware, name: str, quant: str, ctx: int = 36864) -> SpeedModel:
    spec = spec_of(name, quant)
    est = estimate_memory(spec, RunSettings(ctx=ctx))
    return speed_model(spec, est, fit_model(est, hw.devices, hw.ram_bytes), hw)


def test_qwen3_decode_flattens_where_its_kernel_changes(h200: Hardware) -> None:
    # measured on the H200: 265-276 tok/s empty, 207 at 16k, 199 at 32k: most of the loss before 8k tokens
    model = model_on(h200, "qwen3-coder-30b-a3b", "Q4_K_M")
    s = model.seconds_per_token
    early = (s(MMA_FROM_DEPTH - 1) - s(0)) / MMA_FROM_DEPTH
    late = (s(32768) - s(16384)) / 16384
    assert early > 3 * late
    # llama.cpp switches where the MMA kernel is the faster one: no drop at the switch
    assert model.decode_tok_s(MMA_FROM_DEPTH) >= model.decode_tok_s(MMA_FROM_DEPTH - 1)


def test_mla_decode_bends_where_the_blocks_fill_the_gpu(h200: Hardware) -> None:
    # measured: 159-162 tok/s empty, 128 at 8k, 117 at 32k: most of the loss in the first 8k tokens
    model = model_on(h200, "glm-4.7-flash", "Q4_K_M")
    s = model.seconds_per_token
    early = (s(8192) - s(0)) / 8192
    late = (s(32768) - s(16384)) / 16384
    assert early > 3 * late


def test_the_desktop_and_spark_keep_one_attention_cost_for_every_kernel() -> None:
    # their points come from builds that chose kernels otherwise: the device facts must not change a prediction
    for name in ("desktop-4090-5070ti", "dgx-spark"):
        hw = load_hardware_profile(name).hardware()
        blind = replace(hw, devices=tuple(replace(d, compute_capability=0, sm_count=0) for d in hw.devices))
        assert any(d.compute_capability for d in hw.devices)
        for model, quant in (("qwen3-coder-30b-a3b", "Q4_K_M"), ("glm-4.7-flash", "Q4_K_M")):
            for depth in (0, 16384):
                assert model_on(hw, model, quant).decode_tok_s(depth) == model_on(blind, model, quant).decode_tok_s(
                    depth)
