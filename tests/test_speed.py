"""Speed prediction: bandwidth model, calibration from measured points, online correction."""

from __future__ import annotations

from dataclasses import replace

import pytest

from hybridd.model.memory import RunSettings, estimate_memory
from hybridd.model.spec import ModelSpec, model_spec
from hybridd.place.fit import fit_model
from hybridd.place.hardware import Hardware
from hybridd.place.speed import (
    CLASS_CONSTANTS,
    RAM_PLACE,
    Calibration,
    DepthTerm,
    DeviceClass,
    SpeedModel,
    calibrate,
    read_layout,
    speed_model,
)
from hybridd.probe.hardware_profiles import load_hardware_profile
from hybridd.probe.model_profiles import load_profile, profile_header


def spec_of(name: str, quant: str | None = None) -> ModelSpec:
    header = profile_header(load_profile(name), quant)
    return model_spec(header.metadata, header.tensors)


@pytest.fixture(scope="module")
def desktop() -> Hardware:
    return load_hardware_profile("desktop-4090-5070ti").hardware()


@pytest.fixture(scope="module")
def spark() -> Hardware:
    return load_hardware_profile("dgx-spark").hardware()


def tok_s(spec: ModelSpec, hw: Hardware, ctx: int = 4096, position: int = 0, kv: str = "f16") -> float:
    est = estimate_memory(spec, RunSettings(ctx=ctx, type_k=kv, type_v=kv))
    fit = fit_model(est, hw.devices, hw.ram_bytes)
    return speed_model(spec, est, fit, hw).decode_tok_s(position)


def test_the_desktops_glm_points_are_reproduced(desktop: Hardware, spark: Hardware) -> None:
    # issue 15: Q8_0 at 64k with a 49-token prompt ran 109 tok/s, Q4_K_M at 202k 133 tok/s (q8_0 cache both)
    assert tok_s(spec_of("glm-4.7-flash", "Q8_0"), desktop, 65536, 49, "q8_0") == pytest.approx(109, rel=0.05)
    assert tok_s(spec_of("glm-4.7-flash", "Q4_K_M"), desktop, 202752, 49, "q8_0") == pytest.approx(133, rel=0.05)
    assert 40 <= tok_s(spec_of("glm-4.7-flash", "Q8_0"), spark, 65536, 49, "q8_0") <= 46
    assert tok_s(spec_of("gpt-oss-120b"), spark) == pytest.approx(59.02, rel=0.05)  # llama-bench tg32 on a Spark


def test_a_small_model_pays_a_fixed_cost_per_tensor(desktop: Hardware) -> None:
    # Q4_K_M reads 0.58x the bytes of Q8_0 but runs only 1.2x faster: the ops' fixed costs do not shrink
    q8 = tok_s(spec_of("glm-4.7-flash", "Q8_0"), desktop, 65536, 49, "q8_0")
    q4 = tok_s(spec_of("glm-4.7-flash", "Q4_K_M"), desktop, 65536, 49, "q8_0")
    assert 1.1 < q4 / q8 < 1.35


@pytest.mark.parametrize("start", [0, 500, 7000, 7900, 9000])
def test_mean_decode_over_a_completion_is_the_exact_average(start: int) -> None:
    # a KV read capped at 1000 cells, and a kernel that runs up to 7936 tokens and another from there
    terms = (DepthTerm(1e-6, 1000), DepthTerm(2e-7, 1e9, stop=7936), DepthTerm(5e-8, 1e9, start=7936),
             DepthTerm(1e-6, 8448, start=7936))
    model = SpeedModel(weight_s=0.01, depth=terms, prefill_tok_s=1000.0)
    n = 2000
    exact = n / sum(model.seconds_per_token(start + i + 0.5) for i in range(n))
    assert model.mean_decode_tok_s(start, n) == pytest.approx(exact, rel=1e-5)
    capped = SpeedModel(weight_s=0.01, depth=terms[:1], prefill_tok_s=1000.0)
    assert capped.mean_decode_tok_s(5000, 10) == pytest.approx(capped.decode_tok_s(5000))  # past the cap: flat


def test_moe_reads_only_active_experts(desktop: Hardware) -> None:
    glm = spec_of("glm-4.7-flash", "Q4_K_M")
    est = estimate_memory(glm, RunSettings(ctx=4096))
    layout = read_layout(glm, est, fit_model(est, desktop.devices, desktop.ram_bytes))
    read = sum(b for _, b in layout.weight_bytes)
    assert read < glm.weight_bytes / 5  # ~3B of 30B
    assert read == glm.active_bytes_per_token


def test_layers_in_ram_read_at_ram_speed_and_are_slower(desktop: Hardware) -> None:
    glm = spec_of("glm-4.7-flash", "Q4_K_M")
    est = estimate_memory(glm, RunSettings(ctx=4096))
    squeezed = tuple(replace(d, free_bytes=d.total_bytes // 2) for d in desktop.devices)
    fit = fit_model(est, squeezed, desktop.ram_bytes)
    assert fit.runs and not fit.fits
    layout = read_layout(glm, est, fit)
    assert dict(layout.weight_bytes)[RAM_PLACE] > 0
    slow = speed_model(glm, est, fit, desktop).decode_tok_s(0)
    assert fit.n_cpu_moe > 0  # MoE: experts go to RAM before whole layers
    assert slow < 0.9 * tok_s(glm, desktop)


def test_offload_efficiency_is_derived_from_the_cpu_layers_point(desktop: Hardware) -> None:
    eff = calibrate(desktop)
    assert eff.ram is not None and 0 < eff.ram < eff.constants.efficiency
    without = replace(desktop, measured=tuple(p for p in desktop.measured if not p.cpu_layers))
    assert calibrate(without).ram is None


def test_kv_reads_slow_decode_as_the_context_fills(spark: Hardware) -> None:
    glm = spec_of("glm-4.7-flash", "Q4_K_M")
    assert tok_s(glm, spark, 131072, 100_000) < 0.6 * tok_s(glm, spark, 131072, 0)


def test_hardware_without_points_uses_its_class_constants() -> None:
    pro = load_hardware_profile("rtx-pro-6000").hardware()
    assert calibrate(pro).constants == CLASS_CONSTANTS[DeviceClass.DISCRETE]
    est = estimate_memory(spec_of("glm-4.7-flash"), RunSettings())
    model = speed_model(spec_of("glm-4.7-flash"), est, fit_model(est, pro.devices, pro.ram_bytes), pro)
    assert model.prefill_tok_s > model.decode_tok_s(0) * 10


def test_prefill_comes_from_the_measured_prefill_point(spark: Hardware) -> None:
    oss = spec_of("gpt-oss-20b")
    est = estimate_memory(oss, RunSettings())
    model = speed_model(oss, est, fit_model(est, spark.devices, 0), spark)
    assert model.prefill_tok_s == pytest.approx(3670.42, rel=1e-6)


def test_calibration_is_an_ewma_of_the_ratio_per_node_and_model() -> None:
    cal = Calibration()
    assert cal.factor("spark", "m") == 1.0
    cal = cal.observe("spark", "m", predicted_tok_s=40.0, measured_tok_s=20.0)
    assert cal.factor("spark", "m") == pytest.approx(0.5)
    cal = cal.observe("spark", "m", 40.0, 40.0)
    assert cal.factor("spark", "m") == pytest.approx(0.7 * 0.5 + 0.3 * 1.0)
    assert cal.factor("spark", "other") == cal.factor("spark", "m")  # node-wide fallback
    assert cal.factor("local", "m") == 1.0
    assert cal.observe("spark", "m", 0.0, 10.0) is cal  # garbage timings are ignored
    assert Calibration().observe("n", "m", 1.0, 1e9).factor("n", "m") == 10.0  # clamped


def test_a_header_without_weights_gets_a_finite_speed() -> None:
    from hybridd.model.memory import RunSettings, estimate_memory
    from hybridd.model.spec import model_spec
    from hybridd.place.devices import Device
    from hybridd.place.fit import fit_model
    from hybridd.place.hardware import Hardware
    from hybridd.place.speed import speed_model

    spec = model_spec({"general.architecture": "llama", "llama.block_count": 2}, ())
    est = estimate_memory(spec, RunSettings(ctx=4096))
    hw = Hardware("cpu", (Device("ram", 2**34, 2**34, unified=True, bandwidth_bytes_s=5e10),), 0, 5e10)
    speed = speed_model(spec, est, fit_model(est, hw.devices, 0), hw)
    assert 0 < speed.decode_tok_s(4096) < float("inf") and speed.prefill_tok_s > 0
