"""ModelSpec from metadata + tensor infos: attention kinds, KV geometry, recurrent state, MoE, defaults."""

from __future__ import annotations

from typing import Any

import pytest

from hybridd.model.ggml_types import BY_NAME
from hybridd.model.header import TensorInfo
from hybridd.model.spec import AttentionKind, SwaType, model_spec
from hybridd.model.synth import synth_tensors, tensor_layout
from tests.twins import (
    deepseek2_mla_twin,
    gemma3_twin,
    gpt_oss_twin,
    llama_gqa_twin,
    qwen2_twin,
    qwen3_twin,
    qwen3moe_twin,
    qwen3next_twin,
    qwen35moe_twin,
)


def _spec(md: dict[str, Any]):  # type: ignore[no-untyped-def]
    return model_spec(md, synth_tensors(md, 10**9))


def test_llama_gqa_geometry() -> None:
    spec = _spec(llama_gqa_twin())
    assert spec.n_layer == 32
    assert all(ly.attention is AttentionKind.FULL for ly in spec.layers)
    assert spec.layers[0].k_values_per_token == 8 * 128
    assert spec.layers[0].v_values_per_token == 8 * 128
    assert spec.warnings == ()


def test_gemma3_sliding_window_pattern() -> None:
    spec = _spec(gemma3_twin())
    kinds = [ly.attention for ly in spec.layers]
    # set_swa_pattern(6): every 6th layer (5, 11, ...) is global
    assert [i for i, k in enumerate(kinds) if k is AttentionKind.FULL] == list(range(5, 62, 6))
    assert spec.swa_type is SwaType.STANDARD
    assert spec.n_swa == 1024
    assert spec.layers[0].sliding_window == 1024 and spec.layers[5].sliding_window == 0


def test_gemma3_without_window_has_no_swa() -> None:
    md = gemma3_twin()
    del md["gemma3.attention.sliding_window"]
    spec = _spec(md)
    assert all(ly.attention is AttentionKind.FULL for ly in spec.layers)
    assert spec.swa_type is SwaType.NONE


def test_explicit_swa_pattern_array_wins() -> None:
    md = gemma3_twin()
    md["gemma3.attention.sliding_window_pattern"] = [i % 2 == 0 for i in range(62)]
    spec = _spec(md)
    assert spec.layers[0].attention is AttentionKind.SLIDING
    assert spec.layers[1].attention is AttentionKind.FULL


def test_gpt_oss_alternates_window_and_full() -> None:
    spec = _spec(gpt_oss_twin())
    assert [ly.attention for ly in spec.layers[:4]] == [AttentionKind.SLIDING, AttentionKind.FULL] * 2
    assert spec.n_expert == 4 and spec.n_expert_used == 2


def test_deepseek2_mla_caches_k_only() -> None:
    spec = _spec(deepseek2_mla_twin())
    layer = spec.layers[3]
    assert spec.is_mla
    assert layer.k_values_per_token == 512 + 64  # kv_lora_rank + rope dims, one KV head
    assert not layer.has_v_cache and layer.v_values_per_token == 0
    assert spec.layers[0].n_expert == 0  # leading dense block
    assert spec.layers[1].n_expert == 4


def test_deepseek2_without_mla_keys_is_plain_mha() -> None:
    md = deepseek2_mla_twin()
    del md["deepseek2.attention.key_length_mla"], md["deepseek2.attention.value_length_mla"]
    spec = model_spec(md, [])
    assert not spec.is_mla
    assert spec.layers[0].has_v_cache


def test_qwen3next_hybrid_layers_and_state() -> None:
    spec = _spec(qwen3next_twin())
    full = [ly.index for ly in spec.layers if ly.attention is AttentionKind.FULL]
    assert full == list(range(3, 48, 4))  # full_attention_interval 4
    recurrent = spec.recurrent_layers[0]
    # n_embd_r = (d_conv - 1) * (d_inner + 2 * n_group * d_state); n_embd_s = d_state * d_inner
    assert recurrent.recurrent_conv_values == 3 * (4096 + 2 * 16 * 128)
    assert recurrent.recurrent_ssm_values == 128 * 4096


def test_qwen35moe_hybrid_layers_state_and_mtp() -> None:
    spec = _spec(qwen35moe_twin())
    assert spec.n_layer == 48 and spec.n_layer_all == 49
    full = [ly.index for ly in spec.layers if ly.attention is AttentionKind.FULL]
    assert full == list(range(3, 48, 4))
    assert spec.layers[48].attention is AttentionKind.NONE  # the MTP block
    assert spec.layers[3].k_values_per_token == 2 * 256
    recurrent = spec.recurrent_layers[0]
    # 64 value heads of 128: d_inner 8192; conv channels 8192 + 2 * 16 * 128
    assert recurrent.recurrent_conv_values == 3 * (8192 + 2 * 16 * 128)
    assert recurrent.recurrent_ssm_values == 128 * 8192
    assert spec.mtp_bytes > 0 and spec.warnings == ()


def test_qwen3_and_qwen3moe_queries_wider_than_embedding() -> None:
    for twin, n_layer, n_head, n_head_kv in ((qwen3_twin, 64, 64, 8), (qwen3moe_twin, 48, 32, 4)):
        spec = _spec(twin())
        assert spec.n_layer == n_layer
        assert all(ly.attention is AttentionKind.FULL for ly in spec.layers)
        assert spec.layers[0].n_head == n_head and spec.layers[0].k_values_per_token == n_head_kv * 128
        assert spec.warnings == ()


def test_qwen2_head_size_from_embedding() -> None:
    spec = _spec(qwen2_twin())
    assert spec.layers[0].key_length == 3584 // 28
    assert spec.layers[0].k_values_per_token == 4 * 128
    assert any(t.name == "blk.0.attn_q.bias" for t in synth_tensors(qwen2_twin(), 10**9))


def test_recurrent_layers_array_overrides_interval() -> None:
    md = qwen3next_twin()
    md["qwen3next.attention.recurrent_layers"] = [i % 2 == 0 for i in range(48)]
    spec = model_spec(md, [])
    assert spec.layers[0].attention is AttentionKind.RECURRENT
    assert spec.layers[1].attention is AttentionKind.FULL


def test_nextn_layers_have_no_cache() -> None:
    md = deepseek2_mla_twin()
    md["deepseek2.block_count"] = 48
    md["deepseek2.nextn_predict_layers"] = 1
    spec = _spec(md)
    assert spec.n_layer == 47
    assert spec.layers[47].attention is AttentionKind.NONE
    assert spec.mtp_bytes > 0


def test_defaults_follow_llama_cpp() -> None:
    md = {"general.architecture": "llama", "llama.block_count": 2, "llama.embedding_length": 4096,
          "llama.attention.head_count": 32}
    spec = model_spec(md, [])
    # head_count_kv defaults to head_count, key/value length to n_embd / n_head
    assert spec.layers[0].n_head_kv == 32
    assert spec.layers[0].key_length == 128 and spec.layers[0].value_length == 128


def test_unknown_architecture_falls_back_with_warning() -> None:
    md = {"general.architecture": "brandnew", "brandnew.block_count": 4, "brandnew.embedding_length": 512,
          "brandnew.attention.head_count": 8, "brandnew.attention.head_count_kv": 2}
    spec = model_spec(md, [])
    assert any("brandnew" in w for w in spec.warnings)
    assert spec.layers[0].k_values_per_token == 2 * 64


def test_garbage_metadata_does_not_crash() -> None:
    spec = model_spec({"general.architecture": 7, "7.block_count": "x"}, [])  # type: ignore[dict-item]
    assert spec.n_layer == 0 or spec.warnings


def test_moe_active_bytes_count_only_used_experts() -> None:
    f16 = BY_NAME["f16"]
    md = {"general.architecture": "qwen3moe", "qwen3moe.block_count": 1, "qwen3moe.embedding_length": 8,
          "qwen3moe.attention.head_count": 1, "qwen3moe.expert_count": 8, "qwen3moe.expert_used_count": 2}
    tensors = [TensorInfo("blk.0.ffn_up_exps.weight", (8, 16, 8), f16),
               TensorInfo("blk.0.attn_q.weight", (8, 8), f16),
               TensorInfo("token_embd.weight", (8, 100), f16)]
    spec = model_spec(md, tensors)
    layer = spec.layers[0]
    assert layer.expert_bytes == 8 * 16 * 8 * 2
    assert layer.active_bytes == 8 * 8 * 2 + layer.expert_bytes * 2 // 8
    assert spec.tied_embeddings and spec.output_bytes == 8 * 100 * 2


def test_weights_come_from_tensor_infos() -> None:
    md = llama_gqa_twin()
    slots = tensor_layout(md)
    tensors = [TensorInfo(s.name, s.shape, BY_NAME["f16"]) for s in slots]
    spec = model_spec(md, tensors)
    assert spec.weight_bytes == sum(t.n_bytes for t in tensors)
    assert spec.layers[0].weight_bytes == sum(t.n_bytes for t in tensors if t.name.startswith("blk.0."))


@pytest.mark.parametrize("twin", [llama_gqa_twin, gemma3_twin, deepseek2_mla_twin, qwen3next_twin, gpt_oss_twin,
                                  qwen35moe_twin, qwen3moe_twin, qwen3_twin, qwen2_twin])
def test_synth_matches_file_size(twin) -> None:  # type: ignore[no-untyped-def]
    md = twin()
    spec = model_spec(md, synth_tensors(md, 20 * 10**9))
    # the file holds the MTP block too (qwen35moe); llama.cpp does not load it for plain inference
    assert spec.weight_bytes + spec.mtp_bytes == pytest.approx(20 * 10**9 - 8 * 1024 * 1024, rel=0.002)
