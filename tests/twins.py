"""GGUF "architecture twins": a family's real attention geometry with tiny FFN, vocabulary and embedding.

KV and recurrent-state sizes depend on layer count, KV heads, head dims, MLA ranks, windows and ssm sizes, not on
n_embd, n_ff or n_vocab, so a twin keeps the former and shrinks the latter; llama.cpp then loads it on a CPU in
well under a second. The tensor layout comes from hybridd.model.synth.tensor_layout, so loading a twin in
llama.cpp also checks that layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

from hybridd.model.synth import TensorRole, tensor_layout

TWIN_EMBD = 64
TWIN_VOCAB = 256
TWIN_FF = 64


def _common(arch: str, n_layer: int, ctx_train: int = 131072) -> dict[str, Any]:
    return {
        "general.architecture": arch,
        "general.name": f"{arch}-twin",
        f"{arch}.block_count": n_layer,
        f"{arch}.context_length": ctx_train,
        f"{arch}.embedding_length": TWIN_EMBD,
        f"{arch}.feed_forward_length": TWIN_FF,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-6,
        f"{arch}.vocab_size": TWIN_VOCAB,
        "tokenizer.ggml.model": "none",
    }


def llama_gqa_twin() -> dict[str, Any]:
    """Llama-3.1-8B attention: 32 layers, 32 heads, 8 KV heads, head 128 (GQA)."""
    md = _common("llama", 32)
    md.update({"llama.attention.head_count": 32, "llama.attention.head_count_kv": 8,
               "llama.attention.key_length": 128, "llama.attention.value_length": 128,
               "llama.rope.dimension_count": 128})
    return md


def gemma3_twin() -> dict[str, Any]:
    """Gemma-3-27B attention: 62 layers, 32 heads, 16 KV heads, head 128, window 1024, 5 local : 1 global."""
    md = _common("gemma3", 62)
    md.update({"gemma3.attention.head_count": 32, "gemma3.attention.head_count_kv": 16,
               "gemma3.attention.key_length": 128, "gemma3.attention.value_length": 128,
               "gemma3.attention.sliding_window": 1024})
    return md


def deepseek2_mla_twin() -> dict[str, Any]:
    """GLM-4.7-Flash attention (deepseek2 arch, MLA): 47 layers, 20 heads, kv_lora_rank 512, rope 64."""
    md = _common("deepseek2", 47)
    md.update({"deepseek2.attention.head_count": 20, "deepseek2.attention.head_count_kv": 1,
               "deepseek2.attention.q_lora_rank": 64, "deepseek2.attention.kv_lora_rank": 512,
               "deepseek2.attention.key_length": 576, "deepseek2.attention.value_length": 512,
               "deepseek2.attention.key_length_mla": 256, "deepseek2.attention.value_length_mla": 256,
               "deepseek2.rope.dimension_count": 64, "deepseek2.leading_dense_block_count": 1,
               "deepseek2.expert_count": 4, "deepseek2.expert_used_count": 2,
               "deepseek2.expert_shared_count": 1, "deepseek2.expert_feed_forward_length": 32,
               "deepseek2.expert_gating_func": 2})
    return md


def qwen3next_twin() -> dict[str, Any]:
    """Qwen3-Next-80B-A3B geometry: 48 layers, Gated DeltaNet with full attention every 4th layer."""
    md = _common("qwen3next", 48)
    md.update({"qwen3next.attention.head_count": 16, "qwen3next.attention.head_count_kv": 2,
               "qwen3next.attention.key_length": 256, "qwen3next.attention.value_length": 256,
               "qwen3next.rope.dimension_count": 64, "qwen3next.full_attention_interval": 4,
               "qwen3next.ssm.conv_kernel": 4, "qwen3next.ssm.state_size": 128,
               "qwen3next.ssm.group_count": 16, "qwen3next.ssm.time_step_rank": 32,
               "qwen3next.ssm.inner_size": 4096,
               "qwen3next.expert_count": 4, "qwen3next.expert_used_count": 2,
               "qwen3next.expert_feed_forward_length": 32,
               "qwen3next.expert_shared_feed_forward_length": 32})
    return md


def gpt_oss_twin() -> dict[str, Any]:
    """gpt-oss-120b attention: 36 layers, 64 heads, 8 KV heads, head 64, window 128, alternating."""
    md = _common("gpt-oss", 36)
    md.update({"gpt-oss.attention.head_count": 64, "gpt-oss.attention.head_count_kv": 8,
               "gpt-oss.attention.key_length": 64, "gpt-oss.attention.value_length": 64,
               "gpt-oss.rope.dimension_count": 64, "gpt-oss.attention.sliding_window": 128,
               "gpt-oss.expert_count": 4, "gpt-oss.expert_used_count": 2,
               "gpt-oss.expert_feed_forward_length": 32})
    return md


TWINS = {
    "llama-gqa": llama_gqa_twin,
    "gemma3-swa": gemma3_twin,
    "deepseek2-mla": deepseek2_mla_twin,
    "qwen3next-hybrid": qwen3next_twin,
    "gpt-oss-swa": gpt_oss_twin,
}


def add_metadata(writer: gguf.GGUFWriter, metadata: dict[str, Any]) -> None:
    """Add every key but general.architecture (the writer sets it) with the GGUF type its Python type implies."""
    for key, value in metadata.items():
        if key == "general.architecture":
            continue
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, list):
            writer.add_array(key, value)
        else:
            raise TypeError(f"{key}: unsupported metadata value {value!r}")


def write_twin(path: Path, metadata: dict[str, Any]) -> Path:
    """Write `metadata` plus its architecture's tensor layout (zeros: f16 matrices, f32 vectors) to `path`."""
    writer = gguf.GGUFWriter(str(path), str(metadata["general.architecture"]))
    add_metadata(writer, metadata)
    for slot in tensor_layout(metadata):
        # the CPU backend has no f16 kernel for MLA's 3-D attn_k_b/attn_v_b products; real files use f32/q8_0 there
        f32 = slot.role is TensorRole.VECTOR or ".attn_k_b." in slot.name or ".attn_v_b." in slot.name
        dtype = np.float32 if f32 else np.float16
        writer.add_tensor(slot.name, np.zeros(tuple(reversed(slot.shape)), dtype=dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
