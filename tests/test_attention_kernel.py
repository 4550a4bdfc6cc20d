"""The attention kernel llama.cpp's CUDA backend runs for a decoded token, and what the speed model makes of it."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from hybridd.model.memory import RunSettings, estimate_memory
from hybridd.model.spec import LayerSpec
from hybridd.place.attention import MMA_FROM_DEPTH, VEC, decode_kernel
from hybridd.place.fit import fit_model
from hybridd.place.hardware import Hardware
from hybridd.place.speed import (
    CLASS_CONSTANTS,
    PLAIN_CONSTANTS,
    DeviceClass,
    SpeedModel,
    class_constants,
    kernel_aware,
    read_layout,
    speed_model,
)
from hybridd.probe.hardware_profiles import load_hardware_profile
from tests.test_speed import spec_of

HOPPER, H200_SMS = 90, 132


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


def test_heads_per_tile_follow_the_mma_launch_not_the_power_of_two_that_divides() -> None:
    # Qwen2.5-Coder 7B: 28 query heads over 4 KV heads (7 a KV head): tiles of 8 heads, padded, one a KV head
    kernel = decode_kernel(first_attention("qwen2.5-coder-7b", "Q8_0"), HOPPER, H200_SMS)
    assert kernel is not None and kernel.max_partials == H200_SMS * 2 // 4
    # GLM's 20 heads: 16 a tile on Ada and Hopper, 4 a tile on an RTX 50 below a 64k view (5 output tiles)
    glm = first_attention("glm-4.7-flash", "Q4_K_M")
    blackwell = decode_kernel(glm, 120, 70, cells=36864)
    assert blackwell is not None and blackwell.max_partials == 70 * 4 // 5


def test_a_sliding_window_never_reaches_the_mma_view() -> None:
    # gpt-oss: 8 query heads a KV head, 64-wide; its sliding layers hold 768 cells, its full layers the context
    layer = first_attention("gpt-oss-20b")
    assert decode_kernel(layer, HOPPER, H200_SMS, cells=768) == VEC
    full = decode_kernel(layer, HOPPER, H200_SMS, cells=65536)
    assert full is not None and full.mma_from == MMA_FROM_DEPTH


def test_heads_without_a_vec_kernel_run_mma_and_unsupported_ones_have_no_rule() -> None:
    base = first_attention("llama-3.1-8b", "Q4_K_M")
    phi = replace(base, n_head=32, n_head_kv=32, key_length=96, value_length=96)  # 96 is no multiple of 64
    kernel = decode_kernel(phi, HOPPER, H200_SMS)
    assert kernel is not None and kernel.mma_from == 0
    assert decode_kernel(replace(phi, key_length=40, value_length=40), HOPPER, H200_SMS) is None  # tile kernel
    assert decode_kernel(base, HOPPER, H200_SMS, "iq4_nl") is None  # no CUDA flash attention for that cache


def test_moe_layers_in_ram_keep_the_expert_matrix_count(h200: Hardware) -> None:
    # --n-cpu-moe reads the chosen experts from RAM; the layout's matrix counts must not take those bytes
    h100 = load_hardware_profile("h100-sxm").hardware()
    spec = spec_of("qwen3.5-122b-a10b", "Q8_0")
    est = estimate_memory(spec, RunSettings(ctx=32768))
    fit = fit_model(est, h100.devices, h100.ram_bytes)
    assert fit.n_cpu_moe > 0
    layout = read_layout(spec, est, fit)
    assert layout.n_expert_tensors == sum(layer.n_expert_tensors for layer in spec.layers[: len(est.layers)])
    assert 0 < speed_model(spec, est, fit, h100).decode_tok_s(0) < model_on(h200, "qwen3.5-122b-a10b", "Q8_0",
                                                                             32768).decode_tok_s(0)


def test_hbm_gpus_that_do_not_say_their_kernels_predict_with_the_plain_rule(h200: Hardware) -> None:
    blind = replace(h200, devices=tuple(replace(d, sm_count=0) for d in h200.devices))
    assert kernel_aware(h200) and not kernel_aware(blind)
    assert class_constants(blind) == PLAIN_CONSTANTS[DeviceClass.HBM]
    assert class_constants(h200) == CLASS_CONSTANTS[DeviceClass.HBM]
    # GLM-4.7-Flash at 32k: measured 116.6 tok/s; the plain rule's constants stay near it, where the kernel-aware
    # ones with every layer priced as vec would be 20% slow
    deep = model_on(blind, "glm-4.7-flash", "Q4_K_M").decode_tok_s(32768)
    assert deep == pytest.approx(116.6, rel=0.15)
