"""GGUF "architecture twins": a family's real attention geometry with tiny FFN, vocabulary and embedding.

KV and recurrent-state sizes depend on layer count, KV heads, head dims, MLA ranks, windows and ssm sizes, not on
n_embd, n_ff or n_vocab, so a twin keeps the former and shrinks the latter; llama.cpp then loads it on a CPU in
well under a second. The tensor layout comes from hybridd.model.synth.tensor_layout, so loading a twin in
llama.cpp also checks that layout. Tensor data is all zeros and written as a hole (a sparse file), so a twin that
must keep a real n_embd (qwen2 sizes its Q projection n_embd x n_embd) costs no disk and no write time; llama.cpp
maps the file and never reads the weights when it only creates contexts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

from hybridd.demo.tiny_gguf import add_metadata
from hybridd.model.synth import TensorRole, tensor_layout

TWIN_EMBD = 64
TWIN_VOCAB = 256
TWIN_FF = 64
# Matrices of at least BIG_MATRIX values with rows of whole 256-value blocks (only qwen2's, whose rows are its real
# n_embd 3584) are written as tq1_0, 1.69 bits a value: llama.cpp's default load mode reads the whole file, and the
# CPU backend does not repack tq1_0 into a second copy.
BIG_MATRIX = 1024 * 1024
BIG_TYPE = gguf.GGMLQuantizationType.TQ1_0
BIG_BLOCK, BIG_BLOCK_BYTES = gguf.GGML_QUANT_SIZES[BIG_TYPE]


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


def qwen35moe_twin() -> dict[str, Any]:
    """Qwen3.5-122B-A10B geometry: 48 layers, Gated DeltaNet with gated full attention every 4th layer.

    config.json (https://huggingface.co/Qwen/Qwen3.5-122B-A10B/blob/main/config.json, text_config):
    num_hidden_layers 48, full_attention_interval 4, num_attention_heads 32, num_key_value_heads 2, head_dim 256,
    partial_rotary_factor 0.25 (rope dims 64), mrope_section [11, 11, 10], linear_num_key_heads 16,
    linear_num_value_heads 64, linear_key_head_dim = linear_value_head_dim = 128, linear_conv_kernel_dim 4,
    256 experts / 8 used (here 4 / 2), mtp_num_hidden_layers 1. Keys as the vendored converter writes them
    (conversion/qwen.py Qwen3NextModel): ssm.state_size = linear_key_head_dim, ssm.group_count =
    linear_num_key_heads, ssm.time_step_rank = linear_num_value_heads, ssm.inner_size = 128 * 64 = 8192; the MTP
    block is the extra 49th block with nextn_predict_layers 1 (loaded with TENSOR_SKIP, no cache in the main
    context).
    """
    md = _common("qwen35moe", 49, ctx_train=262144)
    md.update({"qwen35moe.attention.head_count": 32, "qwen35moe.attention.head_count_kv": 2,
               "qwen35moe.attention.key_length": 256, "qwen35moe.attention.value_length": 256,
               "qwen35moe.rope.dimension_count": 64, "qwen35moe.rope.dimension_sections": [11, 11, 10, 0],
               "qwen35moe.full_attention_interval": 4, "qwen35moe.nextn_predict_layers": 1,
               "qwen35moe.ssm.conv_kernel": 4, "qwen35moe.ssm.state_size": 128,
               "qwen35moe.ssm.group_count": 16, "qwen35moe.ssm.time_step_rank": 64,
               "qwen35moe.ssm.inner_size": 8192,
               "qwen35moe.expert_count": 4, "qwen35moe.expert_used_count": 2,
               "qwen35moe.expert_feed_forward_length": 32,
               "qwen35moe.expert_shared_feed_forward_length": 32})
    return md


def qwen3moe_twin() -> dict[str, Any]:
    """Qwen3-Coder-30B-A3B-Instruct attention: 48 layers, 32 heads, 4 KV heads, head 128 (Q 4096 > n_embd 2048).

    config.json (https://huggingface.co/Qwen/Qwen3-Coder-30B-A3B-Instruct/blob/main/config.json):
    num_hidden_layers 48, num_attention_heads 32, num_key_value_heads 4, head_dim 128, hidden_size 2048,
    num_experts 128 / num_experts_per_tok 8 (here 4 / 2), max_position_embeddings 262144.
    """
    md = _common("qwen3moe", 48, ctx_train=262144)
    md.update({"qwen3moe.attention.head_count": 32, "qwen3moe.attention.head_count_kv": 4,
               "qwen3moe.attention.key_length": 128, "qwen3moe.attention.value_length": 128,
               "qwen3moe.expert_count": 4, "qwen3moe.expert_used_count": 2,
               "qwen3moe.expert_feed_forward_length": 32})
    return md


def qwen3_twin() -> dict[str, Any]:
    """Qwen3-32B attention: 64 layers, 64 heads, 8 KV heads, head 128 (Q 8192 > n_embd 5120).

    config.json (https://huggingface.co/Qwen/Qwen3-32B/blob/main/config.json): num_hidden_layers 64,
    num_attention_heads 64, num_key_value_heads 8, head_dim 128, hidden_size 5120, max_position_embeddings 40960.
    """
    md = _common("qwen3", 64, ctx_train=40960)
    md.update({"qwen3.attention.head_count": 64, "qwen3.attention.head_count_kv": 8,
               "qwen3.attention.key_length": 128, "qwen3.attention.value_length": 128})
    return md


QWEN2_EMBD = 3584


def qwen2_twin() -> dict[str, Any]:
    """Qwen2.5-Coder-7B attention: 28 layers, 28 heads, 4 KV heads, head 128 = hidden_size 3584 / 28.

    config.json (https://huggingface.co/Qwen/Qwen2.5-Coder-7B/blob/main/config.json): num_hidden_layers 28,
    num_attention_heads 28, num_key_value_heads 4, hidden_size 3584, max_position_embeddings 32768; no head_dim
    (llama.cpp derives n_embd / n_head). llama.cpp's qwen2 loader sizes Q and the output projection n_embd x n_embd
    and its graph reshapes Q to (n_embd / n_head, n_head), so this twin keeps the real n_embd (only FFN and
    vocabulary shrink) and writes no key_length, as the converter does not, so the n_embd / n_head default is
    exercised. Q/K/V carry biases.
    """
    md = _common("qwen2", 28, ctx_train=32768)
    md.update({"qwen2.embedding_length": QWEN2_EMBD, "qwen2.attention.head_count": 28,
               "qwen2.attention.head_count_kv": 4})
    return md


TWINS = {
    "llama-gqa": llama_gqa_twin,
    "gemma3-swa": gemma3_twin,
    "deepseek2-mla": deepseek2_mla_twin,
    "qwen3next-hybrid": qwen3next_twin,
    "gpt-oss-swa": gpt_oss_twin,
    "qwen35moe-hybrid": qwen35moe_twin,
    "qwen3moe-gqa": qwen3moe_twin,
    "qwen3-gqa": qwen3_twin,
    "qwen2-gqa": qwen2_twin,
}


def write_twin(path: Path, metadata: dict[str, Any]) -> Path:
    """Write `metadata` plus its architecture's tensor layout (zeros: f16 matrices, f32 vectors) to `path`.

    The tensor infos are written as usual; the data section, all zeros, is a hole made by extending the file.
    """
    writer = gguf.GGUFWriter(str(path), str(metadata["general.architecture"]))
    add_metadata(writer, metadata)
    data_bytes = 0
    for slot in tensor_layout(metadata):
        # the CPU backend has no f16 kernel for MLA's 3-D attn_k_b/attn_v_b products; real files use f32/q8_0 there
        f32 = slot.role is TensorRole.VECTOR or ".attn_k_b." in slot.name or ".attn_v_b." in slot.name
        shape = tuple(reversed(slot.shape))
        n_values = int(np.prod(slot.shape))
        if not f32 and n_values >= BIG_MATRIX and slot.shape[0] % BIG_BLOCK == 0:
            row_bytes = slot.shape[0] // BIG_BLOCK * BIG_BLOCK_BYTES
            nbytes = n_values // slot.shape[0] * row_bytes
            writer.add_tensor_info(slot.name, (*shape[:-1], row_bytes), np.dtype(np.uint8), nbytes, raw_dtype=BIG_TYPE)
        else:
            dtype = np.dtype(np.float32 if f32 else np.float16)
            nbytes = n_values * dtype.itemsize
            writer.add_tensor_info(slot.name, shape, dtype, nbytes)
        data_bytes += gguf.GGUFWriter.ggml_pad(nbytes, writer.data_alignment)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    assert writer.fout is not None
    fout = writer.fout[0]
    data_start = gguf.GGUFWriter.ggml_pad(fout.tell(), writer.data_alignment)
    writer.close()
    with path.open("r+b") as f:
        f.truncate(data_start + data_bytes)
    return path
