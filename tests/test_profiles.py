"""Hardware and model profiles shipped in profiles/: present, loadable, consistent with published specs."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from hybridd.probe.hardware_profiles import (
    PROFILES_DIR_ENV,
    HardwareProfile,
    ProfileError,
    hardware_profile_from_toml,
    list_hardware_profiles,
    load_hardware_profile,
    profiles_dir,
)

GIB = 1024**3
MIB = 1024**2
REPO_PROFILES = Path(__file__).resolve().parents[1] / "profiles"

HARDWARE_PROFILES = ["asus-ascent-gx10", "cpu-only", "desktop-4090-5070ti", "dgx-spark", "h100-sxm", "h200-sxm",
                     "rtx-4090", "rtx-pro-6000"]
MODEL_PROFILES = [
    "glm-4.7-flash",
    "gpt-oss-120b",
    "gpt-oss-20b",
    "qwen3-coder-30b-a3b",
    "qwen3-coder-next",
    "qwen3.5-397b-a17b",
    "qwen3.5-122b-a10b",
    "llama-3.1-70b",
    "llama-3.1-8b",
    "llama-3.2-3b",
    "llama-3.3-70b",
    "gemma-3-27b",
    "qwen3-32b",
    "qwen2.5-3b",  # the RTX 4090 depth sweep's model
    "qwen2.5-coder-7b",  # the DGX Spark depth sweep's dense model
]
# llama.cpp's architecture string for each model (src/llama-arch.cpp LLM_ARCH_NAMES).
MODEL_ARCHITECTURES = {
    "glm-4.7-flash": "deepseek2",
    "gpt-oss-120b": "gpt-oss",
    "gpt-oss-20b": "gpt-oss",
    "qwen3-coder-30b-a3b": "qwen3moe",
    "qwen3-coder-next": "qwen3next",
    "qwen3.5-397b-a17b": "qwen35moe",
    "qwen3.5-122b-a10b": "qwen35moe",
    "llama-3.1-70b": "llama",
    "llama-3.1-8b": "llama",
    "llama-3.2-3b": "llama",
    "llama-3.3-70b": "llama",
    "gemma-3-27b": "gemma3",
    "qwen3-32b": "qwen3",
    "qwen2.5-3b": "qwen2",
    "qwen2.5-coder-7b": "qwen2",
}

# Published memory sizes and bandwidths (vendor spec pages cited in each profile).
PUBLISHED_DEVICES = {
    "NVIDIA GeForce RTX 4090": (24 * GIB, 1008e9, False),
    "NVIDIA GeForce RTX 5070 Ti": (16 * GIB, 896e9, False),
    "NVIDIA GB10": (128_000_000_000, 273e9, True),
    "NVIDIA RTX PRO 6000 Blackwell": (96 * GIB, 1792e9, False),
    # The device tool's lent GPUs (bench/gpu_check.sh): memory as nvidia-smi reports it there, datasheet bandwidth.
    "NVIDIA H100 80GB HBM3": (81559 * MIB, 3.35e12, False),
    "NVIDIA H200": (143771 * MIB, 4.8e12, False),
}


@pytest.fixture(autouse=True)
def _repo_profiles(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's own HYBRIDD_PROFILES_DIR must not change what these tests read.
    monkeypatch.delenv(PROFILES_DIR_ENV, raising=False)


def load_model_profile(name: str) -> dict[str, Any]:
    with (REPO_PROFILES / "models" / f"{name}.toml").open("rb") as handle:
        return tomllib.load(handle)


def test_every_named_hardware_profile_is_listed_and_loads() -> None:
    assert list_hardware_profiles() == HARDWARE_PROFILES
    for name in HARDWARE_PROFILES:
        profile = load_hardware_profile(name)
        assert isinstance(profile, HardwareProfile)
        assert profile.name == name and profile.sources
        assert profile.system_ram_bytes > 0 and profile.system_ram_bandwidth_bytes_s > 0


def test_hardware_device_figures_match_published_specs() -> None:
    seen = set()
    for name in HARDWARE_PROFILES:
        for spec in load_hardware_profile(name).device_specs:
            memory, bandwidth, unified = PUBLISHED_DEVICES[spec.name]
            assert (spec.memory_bytes, spec.bandwidth_bytes_s, spec.unified) == (
                memory,
                bandwidth,
                unified,
            ), name
            seen.add(spec.name)
    assert seen == set(PUBLISHED_DEVICES)


def test_desktop_has_40_gib_over_two_gpus_and_dual_channel_ddr5() -> None:
    desktop = load_hardware_profile("desktop-4090-5070ti")

    assert [spec.name for spec in desktop.device_specs] == [
        "NVIDIA GeForce RTX 4090",
        "NVIDIA GeForce RTX 5070 Ti",
    ]
    assert sum(spec.memory_bytes for spec in desktop.device_specs) == 40 * GIB
    assert 80e9 <= desktop.system_ram_bandwidth_bytes_s <= 90e9


def test_spark_and_gx10_share_the_gb10_and_its_memory_is_the_system_memory() -> None:
    for name in ("dgx-spark", "asus-ascent-gx10"):
        (gb10,) = load_hardware_profile(name).device_specs
        profile = load_hardware_profile(name)
        assert gb10.unified and gb10.memory_bytes == profile.system_ram_bytes
        assert profile.system_ram_bandwidth_bytes_s == gb10.bandwidth_bytes_s == 273e9


def test_cpu_only_has_no_devices() -> None:
    cpu = load_hardware_profile("cpu-only")

    assert cpu.device_specs == () and cpu.system_ram_bytes == 64 * GIB


def test_measured_points_carry_the_design_facts_with_sources() -> None:
    desktop = {
        (p.model, p.engine, p.quant, p.cpu_layers): p for p in load_hardware_profile("desktop-4090-5070ti").measured
    }
    spark = load_hardware_profile("dgx-spark").measured

    q8 = desktop[("glm-4.7-flash", "llama.cpp", "Q8_0", 0)]  # issue 15: Q8_0, 64k, q8_0 cache, 49-token prompt
    assert (q8.decode_tok_s, q8.ctx, q8.kv_type, q8.prompt_tokens) == (109.0, 65536, "q8_0", 49)
    q4 = desktop[("glm-4.7-flash", "llama.cpp", "Q4_K_M", 0)]
    assert (q4.decode_tok_s, q4.ctx) == (133.0, 202752)
    assert desktop[("glm-4.7-flash", "ollama", "Q8_0", 4)].decode_tok_s == 31.7
    glm_spark = next(p for p in spark if p.model == "glm-4.7-flash")
    assert (glm_spark.decode_tok_s, glm_spark.decode_tok_s_high) == (40.0, 46.0)
    dense_70b = [p.decode_tok_s for p in spark if p.model == "llama-3.1-70b"]
    assert dense_70b and max(dense_70b) < 5
    # Two Sparks in tensor parallel: well short of 2x one node.
    single = next(p for p in spark if p.model == "gpt-oss-120b" and p.engine == "vllm" and p.nodes == 1)
    double = next(p for p in spark if p.model == "gpt-oss-120b" and p.nodes == 2)
    assert 1.0 < double.decode_tok_s / single.decode_tok_s < 1.5
    known_models = set(MODEL_PROFILES)
    for name in HARDWARE_PROFILES:
        for point in load_hardware_profile(name).measured:
            assert point.source and point.model in known_models, (name, point)


def test_profile_devices_become_idle_placement_devices() -> None:
    desktop = load_hardware_profile("desktop-4090-5070ti")

    big, small = desktop.devices()

    assert (big.total_bytes, big.free_bytes, big.unified) == (24 * GIB, 24 * GIB, False)
    assert big.reserve_bytes == desktop.device_specs[0].reserve_bytes
    assert small.bandwidth_bytes_s == 896e9
    assert [d.reserve_bytes for d in desktop.devices(reserve_bytes=0)] == [0, 0]
    assert load_hardware_profile("cpu-only").devices() == []


def test_unknown_hardware_profile_lists_the_valid_names() -> None:
    with pytest.raises(ProfileError) as caught:
        load_hardware_profile("dgx-sparkle")

    message = str(caught.value)
    assert "unknown hardware profile 'dgx-sparkle'" in message
    for name in HARDWARE_PROFILES:
        assert name in message


def test_profiles_dir_env_points_at_another_profiles_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "hardware").mkdir()
    text = (REPO_PROFILES / "hardware" / "cpu-only.toml").read_text(encoding="utf-8")
    (tmp_path / "hardware" / "cpu-only.toml").write_text(text, encoding="utf-8")
    monkeypatch.setenv(PROFILES_DIR_ENV, str(tmp_path))

    assert profiles_dir() == tmp_path
    assert list_hardware_profiles() == ["cpu-only"]
    assert load_hardware_profile("cpu-only").name == "cpu-only"


MINIMAL = """
name = "box"
description = "a box"
sources = ["https://example.invalid/spec"]
[system]
ram_bytes = 1024
ram_bandwidth_bytes_s = 1e9
[[devices]]
name = "GPU"
memory_bytes = 2048
bandwidth_bytes_s = 1e12
unified = false
"""


def test_minimal_profile_parses_with_defaults() -> None:
    profile = hardware_profile_from_toml(MINIMAL, name="box")

    assert profile.device_specs[0].reserve_bytes == 0 and profile.measured == ()


@pytest.mark.parametrize(
    ("edit", "dotted_key"),
    [
        (("memory_bytes = 2048", 'memory_bytes = "lots"'), "devices[0].memory_bytes"),
        (("unified = false", "unified = 0"), "devices[0].unified"),
        (("ram_bytes = 1024", "ram_bytes = -1"), "system.ram_bytes"),
        (("unified = false", "unified = false\nvram = 3"), "devices[0].vram"),
        (('sources = ["https://example.invalid/spec"]', "sources = []"), "sources"),
        (('name = "box"', 'name = "other"'), "name"),
    ],
)
def test_bad_content_names_the_dotted_key(edit: tuple[str, str], dotted_key: str) -> None:
    text = MINIMAL.replace(*edit)

    with pytest.raises(ProfileError) as caught:
        hardware_profile_from_toml(text, name="box", origin="box.toml")

    assert str(caught.value).startswith(f"box.toml: {dotted_key}: ")


def test_bad_measured_point_names_its_index() -> None:
    text = MINIMAL + '[[measured]]\nmodel = "m"\nengine = "e"\ndecode_tok_s = 0\nsource = "s"\n'

    # Worded as the config words a number out of range: one validator reads both (it was "expected a positive number").
    with pytest.raises(ProfileError, match=r"measured\[0\]\.decode_tok_s: must be > 0, got 0"):
        hardware_profile_from_toml(text, name="box")


def test_invalid_toml_is_a_profile_error() -> None:
    with pytest.raises(ProfileError, match="not valid TOML"):
        hardware_profile_from_toml("name = ", name="box")


def test_every_named_model_profile_exists_and_no_other() -> None:
    assert sorted(path.stem for path in (REPO_PROFILES / "models").glob("*.toml")) == sorted(MODEL_PROFILES)


@pytest.mark.parametrize("name", MODEL_PROFILES)
def test_model_profile_has_the_hparams_the_estimator_needs(name: str) -> None:
    profile = load_model_profile(name)
    metadata = profile["metadata"]
    arch = metadata["general.architecture"]

    assert profile["name"] == name and profile["description"]
    assert arch == MODEL_ARCHITECTURES[name]
    for key in ("block_count", "context_length", "embedding_length", "attention.head_count"):
        value = metadata[f"{arch}.{key}"]
        assert isinstance(value, int) and value > 0, key
    assert metadata.get(f"{arch}.attention.head_count_kv", metadata[f"{arch}.attention.head_count"]) > 0
    assert isinstance(metadata.get(f"{arch}.vocab_size"), int)
    # Every key is general.* or under the architecture's own prefix, as llama.cpp looks them up.
    for key in metadata:
        assert key.startswith(("general.", f"{arch}.")), key
    assert profile["quants"]
    for quant, entry in profile["quants"].items():
        assert isinstance(entry["file_bytes"], int) and entry["file_bytes"] > 1_000_000_000, quant
        # a published size names its page; one computed from the tensor layout says so (issue 15, item 5)
        assert entry["source"].startswith(("https://", "computed")), quant
    assert profile["sources"] and all(isinstance(s, str) and s for s in profile["sources"])


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # MLA: one compressed K head of 576, V read from it.
        (
            "glm-4.7-flash",
            {"attention.head_count_kv": 1, "attention.key_length": 576, "attention.kv_lora_rank": 512},
        ),
        ("gpt-oss-120b", {"block_count": 36, "attention.sliding_window": 128, "expert_count": 128}),
        ("gpt-oss-20b", {"block_count": 24, "expert_count": 32}),
        ("gemma-3-27b", {"block_count": 62, "attention.sliding_window": 1024, "attention.head_count_kv": 16}),
        ("qwen3-coder-next", {"full_attention_interval": 4, "ssm.inner_size": 4096, "expert_count": 512}),
        ("qwen3.5-397b-a17b", {"block_count": 60, "full_attention_interval": 4, "expert_used_count": 10}),
        ("llama-3.1-70b", {"block_count": 80, "attention.head_count_kv": 8, "feed_forward_length": 28672}),
        ("llama-3.3-70b", {"block_count": 80, "attention.head_count_kv": 8, "feed_forward_length": 28672}),
        ("llama-3.2-3b", {"block_count": 28, "embedding_length": 3072, "attention.head_count": 24,
                          "feed_forward_length": 8192}),
    ],
)
def test_architecture_specific_keys(name: str, expected: dict[str, int]) -> None:
    metadata = load_model_profile(name)["metadata"]
    arch = metadata["general.architecture"]

    assert {key: metadata[f"{arch}.{key}"] for key in expected} == expected


def test_quantized_sizes_grow_with_bits() -> None:
    # A transposed or mistyped figure would break the order Q4 < Q5 < Q6 < Q8 within one listing.
    order = ["Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]
    for name in MODEL_PROFILES:
        quants = load_model_profile(name)["quants"]
        sizes = [quants[q]["file_bytes"] for q in order if q in quants]
        assert sizes == sorted(sizes), name
