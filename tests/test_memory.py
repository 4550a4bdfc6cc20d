"""Memory estimate: exact cache arithmetic, llama.cpp's padding rules, and figures llama.cpp users published."""

from __future__ import annotations

from typing import Any

import pytest

from hybridd.model.ggml_types import BY_NAME, row_bytes
from hybridd.model.memory import SCHED_MAX_COPIES, RunSettings, context_geometry, estimate_memory, pipeline_copies
from hybridd.model.spec import ModelSpec, model_spec
from hybridd.model.synth import synth_tensors
from hybridd.probe.model_profiles import load_profile, profile_header
from tests.twins import deepseek2_mla_twin, gemma3_twin, llama_gqa_twin, qwen3next_twin

GIB = 1024**3


def _spec(md: dict[str, Any]) -> ModelSpec:
    return model_spec(md, synth_tensors(md, 10**9))


def _profile(name: str, quant: str | None = None) -> ModelSpec:
    header = profile_header(load_profile(name), quant)
    return model_spec(header.metadata, header.tensors)


def test_ggml_block_sizes_are_exact() -> None:
    assert row_bytes(BY_NAME["q8_0"], 1024) == 1024 // 32 * 34
    assert row_bytes(BY_NAME["q4_0"], 1024) == 1024 // 32 * 18
    assert row_bytes(BY_NAME["q4_1"], 64) == 40
    assert row_bytes(BY_NAME["q5_0"], 64) == 44
    assert row_bytes(BY_NAME["q5_1"], 64) == 48
    assert row_bytes(BY_NAME["iq4_nl"], 64) == 36
    assert row_bytes(BY_NAME["bf16"], 64) == 128


def test_q8_0_cache_is_34_over_32_of_a_byte_per_value() -> None:
    spec = _spec(llama_gqa_twin())
    f16 = estimate_memory(spec, RunSettings(ctx=8192, type_k="f16", type_v="f16"))
    q8 = estimate_memory(spec, RunSettings(ctx=8192, type_k="q8_0", type_v="q8_0"))
    assert q8.kv_bytes * 2 * 32 == f16.kv_bytes * 34  # 6% more than "1 byte per element"


def test_context_is_padded_to_256() -> None:
    spec = _spec(llama_gqa_twin())
    geo = context_geometry(spec, RunSettings(ctx=10000))
    assert geo.n_ctx == geo.n_ctx_seq == 10240
    assert context_geometry(spec, RunSettings(ctx=10000, n_seq=3)).n_ctx_seq == pad256(10240 // 3)


def pad256(n: int) -> int:
    return -(-n // 256) * 256


def test_slots_split_the_context_unless_unified() -> None:
    spec = _spec(llama_gqa_twin())
    split = estimate_memory(spec, RunSettings(ctx=8192, n_seq=4))
    unified = estimate_memory(spec, RunSettings(ctx=8192, n_seq=4, kv_unified=True))
    assert split.geometry.n_ctx_seq == 2048 and split.geometry.n_stream == 4
    assert split.kv_bytes == unified.kv_bytes  # same cells in total, split in streams


def test_sliding_window_layers_hold_window_plus_ubatch() -> None:
    spec = _spec(gemma3_twin())
    est = estimate_memory(spec, RunSettings(ctx=131072))
    assert est.geometry.swa_cells == 1536  # pad(1024 + 512, 256)
    full = estimate_memory(spec, RunSettings(ctx=131072, swa_full=True))
    assert full.kv_bytes > 4 * est.kv_bytes


def test_hybrid_recurrent_state_does_not_grow_with_context() -> None:
    spec = _spec(qwen3next_twin())
    small = estimate_memory(spec, RunSettings(ctx=4096))
    large = estimate_memory(spec, RunSettings(ctx=262144))
    assert small.recurrent_bytes == large.recurrent_bytes == 36 * (3 * 8192 + 128 * 4096) * 4
    assert large.kv_bytes == 64 * small.kv_bytes


def test_transposed_v_is_padded_to_the_widest_layer_without_flash_attention() -> None:
    md = llama_gqa_twin()
    md["llama.attention.head_count_kv"] = [8] * 31 + [16]
    spec = _spec(md)
    no_fa = estimate_memory(spec, RunSettings(ctx=4096, flash_attn=False))
    fa = estimate_memory(spec, RunSettings(ctx=4096, flash_attn=True))
    assert no_fa.layers[0].v_bytes == 2 * fa.layers[0].v_bytes


def test_flash_attention_on_cuda_copies_a_quantized_cache_to_f16() -> None:
    spec = _spec(llama_gqa_twin())
    q8 = estimate_memory(spec, RunSettings(ctx=32768, type_k="q8_0", type_v="q8_0", backend="cuda"))
    f16 = estimate_memory(spec, RunSettings(ctx=32768, backend="cuda"))
    cpu = estimate_memory(spec, RunSettings(ctx=32768, type_k="q8_0", type_v="q8_0", backend="cpu"))
    assert q8.fa_copy_bytes == 2 * 32768 * 1024 * 2  # one layer's K and V as f16
    assert f16.fa_copy_bytes == 0 and cpu.fa_copy_bytes == 0


def test_totals_add_up() -> None:
    est = estimate_memory(_spec(deepseek2_mla_twin()), RunSettings(ctx=8192))
    assert est.total_bytes == (est.weights_bytes + est.kv_bytes + est.recurrent_bytes + est.compute_bytes
                               + est.fa_copy_bytes + est.output_buffer_bytes + est.runtime_reserve_bytes)


@pytest.mark.parametrize("bad", [{"ctx": 0}, {"n_seq": 0}, {"type_k": "q3_k_xl"}])
def test_bad_settings_are_rejected(bad: dict[str, Any]) -> None:
    with pytest.raises((ValueError, KeyError)):
        RunSettings(**bad)


# --- published figures -----------------------------------------------------------------------------------

def test_glm_4_7_flash_q8_0_kv_at_112k_is_about_3_1_gib() -> None:
    # DESIGN.md / issue 3: "GLM-4.7-Flash Q8_0 at 112k needs ~3.1 GiB of KV in llama.cpp (MLA, K-only) but
    # ~5.9 GiB in Ollama". llama.cpp's print_info for this model (ollama/ollama#15855,
    # ikawrakow/ik_llama.cpp#1167): n_layer 47, n_head_kv 1, n_embd_head_k 576 - K only.
    est = estimate_memory(_profile("glm-4.7-flash", "Q8_0"), RunSettings(ctx=112 * 1024, type_k="q8_0", type_v="q8_0"))
    assert est.kv_bytes / GIB == pytest.approx(3.1, rel=0.03)
    f16 = estimate_memory(_profile("glm-4.7-flash", "Q8_0"), RunSettings(ctx=112 * 1024))
    assert f16.kv_bytes / GIB == pytest.approx(5.8, rel=0.03)  # the Ollama-sized figure needs f16 for the same K


def test_llama_3_1_kv_matches_hugging_face_table() -> None:
    # https://huggingface.co/blog/llama31#inference-memory-requirements (quoted in huggingface/blog#2345):
    # FP16 KV cache at 128k tokens: 8B 15.62 GB, 70B 39.06 GB (GiB of 128000 tokens).
    est8 = estimate_memory(_profile("llama-3.1-8b"), RunSettings(ctx=128000))
    est70 = estimate_memory(_profile("llama-3.1-70b"), RunSettings(ctx=128000))
    assert est8.kv_bytes / GIB == pytest.approx(15.62, abs=0.01)
    assert est70.kv_bytes / GIB == pytest.approx(39.06, abs=0.01)


def test_gpt_oss_sliding_window_halves_the_kv_cache() -> None:
    # issue 3: a tool that ignores the sliding window is "2x too high for gpt-oss"; llama.cpp keeps
    # pad(128 + n_ubatch, 256) = 768 cells for the 18 windowed layers of gpt-oss-120b.
    spec = _profile("gpt-oss-120b")
    est = estimate_memory(spec, RunSettings(ctx=131072))
    all_full = estimate_memory(spec, RunSettings(ctx=131072, swa_full=True))
    assert est.geometry.swa_cells == 768
    assert all_full.kv_bytes / est.kv_bytes == pytest.approx(2.0, rel=0.02)
    assert est.kv_bytes / GIB == pytest.approx(4.5 + 18 * 768 * 2048 / GIB, rel=0.001)


def test_qwen3_next_charges_kv_to_one_layer_in_four() -> None:
    # issue 3: charging every layer of a Gated-DeltaNet hybrid with KV is "4x too high"
    spec = _profile("qwen3-coder-next")
    est = estimate_memory(spec, RunSettings(ctx=262144))
    naive = sum(ly.k_values_per_token + ly.v_values_per_token for ly in spec.layers) * 2 * 262144
    assert naive / est.kv_bytes == pytest.approx(4.0, rel=0.01)



# --- profile loader ------------------------------------------------------------------------------------------

def test_profiles_are_listed_and_loaded() -> None:
    from hybridd.probe.model_profiles import list_profiles

    names = list_profiles()
    assert "glm-4.7-flash" in names
    profile = load_profile("glm-4.7-flash")
    assert profile.architecture == "deepseek2"
    assert profile.quants["Q8_0"].file_bytes > 0


def test_profiles_dir_env_and_errors(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from hybridd.probe.model_profiles import ProfileError, list_profiles

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny.toml").write_text(
        'name = "tiny"\n[metadata]\n"general.architecture" = "llama"\n"llama.block_count" = 2\n'
        '[quants.Q4_0]\nfile_bytes = 1000\n', encoding="utf-8")
    (tmp_path / "models" / "broken.toml").write_text(
        'name = "broken"\n[metadata]\n"general.architecture" = "llama"\n"llama.block_count" = 2\n'
        '[quants.Q4_0]\nfile_bytes = "big"\n', encoding="utf-8")
    monkeypatch.setenv("HYBRIDD_PROFILES_DIR", str(tmp_path))
    assert list_profiles() == ["broken", "tiny"]
    assert load_profile("tiny").quants["Q4_0"].file_bytes == 1000
    with pytest.raises(ProfileError, match=r"quants\.Q4_0\.file_bytes"):
        load_profile("broken")
    with pytest.raises(ProfileError, match="valid: broken, tiny"):
        load_profile("nope")
    with pytest.raises(ProfileError, match="unknown quant"):
        profile_header(load_profile("tiny"), "Q9")


def test_pipeline_parallelism_only_with_every_layer_on_several_gpus() -> None:
    assert pipeline_copies(2, True) == SCHED_MAX_COPIES == 4
    assert pipeline_copies(1, True) == 1
    assert pipeline_copies(2, False) == 1
    assert pipeline_copies(2, True, tensor_overrides=True) == 1  # --n-cpu-moe is a tensor override


def test_one_backend_compute_buffer_is_the_single_device_case() -> None:
    est = estimate_memory(_spec(llama_gqa_twin()), RunSettings(ctx=8192, backend="cpu"))
    assert est.fa_copy_bytes == 0
    # the CPU backend makes its own inputs: no copy of the hidden state, the same graph otherwise
    assert est.compute_bytes == est.device_compute_bytes(1, holds_output=True) - est.hidden_bytes
    assert est.device_compute_bytes(4, holds_output=False) < est.device_compute_bytes(4, holds_output=True) or (
        est.layer_peak_bytes >= est.logits_bytes)


def test_a_million_token_mask_costs_four_gib_per_gpu_under_pipeline_parallelism() -> None:
    # unsloth PR #7637: Kimi-K3 at 1M context over 4 GPUs, llama.cpp allocated 4.0 GiB per device for the f16 KQ
    # mask (1M x 512 tokens x 2 bytes, four copies); the mask does not depend on the model's shape
    est = estimate_memory(_profile("glm-4.7-flash", "Q4_K_M"), RunSettings(ctx=1024 * 1024, type_k="q8_0",
                                                                           type_v="q8_0"))
    assert est.graph_input_bytes == GIB
    four, one = est.device_compute_bytes(4, holds_output=False), est.device_compute_bytes(1, holds_output=False)
    assert four - one == 3 * (GIB + est.hidden_bytes)
