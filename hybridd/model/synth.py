"""Tensor infos from architecture hyper-parameters, so a profile model (no file) takes the same spec path (pure).

`tensor_layout` names every tensor llama.cpp's loader creates for the architecture (src/models/<arch>.cpp
load_arch_tensors) with its shape; the twin tests write exactly this layout into GGUF files and load them in
llama.cpp, which checks the names and shapes. `synth_tensors` then gives the weight matrices one common
effective bits-per-weight so the total matches a quantization's published file size.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from hybridd.model.ggml_types import BY_NAME, GgmlType
from hybridd.model.header import TensorInfo

# Metadata + tensor-info bytes of a GGUF besides the weights (tokenizer arrays dominate); subtracted from the
# file size before spreading the rest over the weights. Small against any real model.
HEADER_BYTES_ESTIMATE = 8 * 1024 * 1024


class TensorRole(StrEnum):
    """How a tensor is stored in a quantized file: norms and small vectors stay f32."""

    VECTOR = "vector"
    MATRIX = "matrix"


@dataclass(frozen=True, slots=True)
class TensorSlot:
    """One tensor of an architecture's layout: name, ggml-order shape, role."""

    name: str
    shape: tuple[int, ...]
    role: TensorRole


def _i(md: Mapping[str, Any], arch: str, key: str, default: int = 0) -> int:
    value = md.get(f"{arch}.{key}", default)
    if isinstance(value, list):
        return int(max(value)) if value else default
    return int(value)


def _per_layer(md: Mapping[str, Any], arch: str, key: str, n: int, default: int) -> list[int]:
    value = md.get(f"{arch}.{key}")
    if value is None:
        return [default] * n
    if isinstance(value, list):
        return [int(v) for v in value[:n]] + [default] * (n - len(value))
    return [int(value)] * n


class _Layout:
    def __init__(self) -> None:
        self.slots: list[TensorSlot] = []

    def vec(self, name: str, *shape: int) -> None:
        self.slots.append(TensorSlot(name, tuple(shape), TensorRole.VECTOR))

    def mat(self, name: str, *shape: int) -> None:
        self.slots.append(TensorSlot(name, tuple(shape), TensorRole.MATRIX))


def _recurrent_layers(md: Mapping[str, Any], arch: str, n_layer: int) -> list[bool]:
    explicit = md.get(f"{arch}.attention.recurrent_layers")
    if isinstance(explicit, list):
        return [bool(v) for v in explicit[:n_layer]] + [False] * (n_layer - len(explicit))
    interval = _i(md, arch, "full_attention_interval", 4) or 4
    return [(il + 1) % interval != 0 for il in range(n_layer)]


def tensor_layout(metadata: Mapping[str, Any]) -> list[TensorSlot]:
    """Every tensor llama.cpp loads for this architecture, from the GGUF metadata keys alone."""
    md = metadata
    arch = str(md.get("general.architecture", ""))
    n_layer_all = _i(md, arch, "block_count")
    n_nextn = _i(md, arch, "nextn_predict_layers")
    n_layer = n_layer_all - n_nextn
    n_embd = _i(md, arch, "embedding_length")
    n_vocab = _i(md, arch, "vocab_size") or len(md.get("tokenizer.ggml.tokens", []) or [])
    n_head = _per_layer(md, arch, "attention.head_count", n_layer_all, 0)
    n_head_kv = _per_layer(md, arch, "attention.head_count_kv", n_layer_all, 0)
    n_head_kv = [kv or h for kv, h in zip(n_head_kv, n_head, strict=True)]
    n_ff = _per_layer(md, arch, "feed_forward_length", n_layer_all, 0)
    h0 = n_head[0] if n_head and n_head[0] else 1
    head_k = _i(md, arch, "attention.key_length", n_embd // h0)
    head_v = _i(md, arch, "attention.value_length", n_embd // h0)
    n_expert = _i(md, arch, "expert_count")
    n_expert_used = _i(md, arch, "expert_used_count")
    n_ff_exp = _i(md, arch, "expert_feed_forward_length")
    n_ff_shexp = _i(md, arch, "expert_shared_feed_forward_length")
    n_shared = _i(md, arch, "expert_shared_count")
    n_dense_lead = _i(md, arch, "leading_dense_block_count")

    lay = _Layout()
    lay.mat("token_embd.weight", n_embd, n_vocab)
    lay.vec("output_norm.weight", n_embd)
    lay.mat("output.weight", n_embd, n_vocab)

    qk_norm = arch in ("qwen3", "qwen3moe", "gemma3", "qwen3next", "qwen35", "qwen35moe")
    recr = _recurrent_layers(md, arch, n_layer) if arch in ("qwen3next", "qwen35", "qwen35moe") else []

    for il in range(n_layer_all):
        b = f"blk.{il}."
        lay.vec(b + "attn_norm.weight", n_embd)
        if arch == "deepseek2":
            _deepseek2_attention(lay, md, arch, b, n_embd, n_head[il])
        elif arch in ("qwen3next", "qwen35", "qwen35moe") and il < n_layer and recr[il]:
            _gated_delta_net(lay, md, arch, b, n_embd, qwen35=arch != "qwen3next")
        else:
            gated_q = 2 if arch in ("qwen3next", "qwen35", "qwen35moe") else 1
            lay.mat(b + "attn_q.weight", n_embd, head_k * n_head[il] * gated_q)
            lay.mat(b + "attn_k.weight", n_embd, head_k * n_head_kv[il])
            lay.mat(b + "attn_v.weight", n_embd, head_v * n_head_kv[il])
            lay.mat(b + "attn_output.weight", head_k * n_head[il], n_embd)
            if arch == "qwen2":
                lay.vec(b + "attn_q.bias", head_k * n_head[il])
                lay.vec(b + "attn_k.bias", head_k * n_head_kv[il])
                lay.vec(b + "attn_v.bias", head_v * n_head_kv[il])
            if qk_norm:
                lay.vec(b + "attn_q_norm.weight", head_k)
                lay.vec(b + "attn_k_norm.weight", head_k)
            if arch == "gpt-oss":
                lay.vec(b + "attn_sinks.weight", n_head[il])
                lay.vec(b + "attn_output.bias", n_embd)
        if arch in ("gemma3", "gpt-oss", "qwen3next", "qwen35", "qwen35moe"):
            lay.vec(b + "post_attention_norm.weight", n_embd)
        if arch not in ("gpt-oss", "qwen3next", "qwen35", "qwen35moe"):
            lay.vec(b + "ffn_norm.weight", n_embd)

        if n_expert > 0 and il >= n_dense_lead:
            ff_exp = n_ff_exp or n_ff[il] // max(n_expert_used, 1)
            lay.mat(b + "ffn_gate_inp.weight", n_embd, n_expert)
            lay.mat(b + "ffn_gate_exps.weight", n_embd, ff_exp, n_expert)
            lay.mat(b + "ffn_up_exps.weight", n_embd, ff_exp, n_expert)
            lay.mat(b + "ffn_down_exps.weight", ff_exp, n_embd, n_expert)
            if arch == "gpt-oss":
                lay.vec(b + "ffn_gate_inp.bias", n_expert)
                lay.vec(b + "ffn_gate_exps.bias", ff_exp, n_expert)
                lay.vec(b + "ffn_up_exps.bias", ff_exp, n_expert)
                lay.vec(b + "ffn_down_exps.bias", n_embd, n_expert)
            if arch == "deepseek2":
                lay.vec(b + "exp_probs_b.bias", n_expert)
            shexp = 0
            if arch == "deepseek2":
                shexp = ff_exp * n_shared
            elif arch in ("qwen3next", "qwen35", "qwen35moe", "qwen2moe"):
                shexp = n_ff_shexp or n_ff[il]
                lay.vec(b + "ffn_gate_inp_shexp.weight", n_embd)
            if shexp:
                lay.mat(b + "ffn_gate_shexp.weight", n_embd, shexp)
                lay.mat(b + "ffn_up_shexp.weight", n_embd, shexp)
                lay.mat(b + "ffn_down_shexp.weight", shexp, n_embd)
        else:
            lay.mat(b + "ffn_gate.weight", n_embd, n_ff[il])
            lay.mat(b + "ffn_up.weight", n_embd, n_ff[il])
            lay.mat(b + "ffn_down.weight", n_ff[il], n_embd)
        if arch == "gemma3":
            lay.vec(b + "post_ffw_norm.weight", n_embd)
        if il >= n_layer:
            lay.mat(b + "nextn.eh_proj.weight", 2 * n_embd, n_embd)
            lay.vec(b + "nextn.enorm.weight", n_embd)
            lay.vec(b + "nextn.hnorm.weight", n_embd)
            lay.vec(b + "nextn.shared_head_norm.weight", n_embd)
    return lay.slots


def _deepseek2_attention(lay: _Layout, md: Mapping[str, Any], arch: str, b: str, n_embd: int, n_head: int) -> None:
    q_lora = _i(md, arch, "attention.q_lora_rank")
    kv_lora = _i(md, arch, "attention.kv_lora_rank")
    n_rot = _i(md, arch, "rope.dimension_count")
    head_k_mla = _i(md, arch, "attention.key_length_mla") or _i(md, arch, "attention.key_length")
    head_v_mla = _i(md, arch, "attention.value_length_mla") or _i(md, arch, "attention.value_length")
    nope = head_k_mla - n_rot
    if q_lora > 0:
        lay.vec(b + "attn_q_a_norm.weight", q_lora)
        lay.mat(b + "attn_q_a.weight", n_embd, q_lora)
        lay.mat(b + "attn_q_b.weight", q_lora, n_head * head_k_mla)
    else:
        lay.mat(b + "attn_q.weight", n_embd, n_head * head_k_mla)
    lay.vec(b + "attn_kv_a_norm.weight", kv_lora)
    lay.mat(b + "attn_kv_a_mqa.weight", n_embd, kv_lora + n_rot)
    lay.mat(b + "attn_k_b.weight", nope, kv_lora, n_head)
    lay.mat(b + "attn_v_b.weight", kv_lora, head_v_mla, n_head)
    lay.mat(b + "attn_output.weight", n_head * head_v_mla, n_embd)


def _gated_delta_net(lay: _Layout, md: Mapping[str, Any], arch: str, b: str, n_embd: int, qwen35: bool) -> None:
    d_state = _i(md, arch, "ssm.state_size")
    n_group = _i(md, arch, "ssm.group_count")
    dt_rank = _i(md, arch, "ssm.time_step_rank")
    d_conv = _i(md, arch, "ssm.conv_kernel")
    key_dim = d_state * n_group
    value_dim = d_state * dt_rank
    conv_dim = 2 * key_dim + value_dim
    lay.mat(b + "attn_qkv.weight", n_embd, conv_dim)
    lay.mat(b + "attn_gate.weight", n_embd, value_dim)
    lay.vec(b + "ssm_conv1d.weight", d_conv, conv_dim)
    lay.vec(b + "ssm_dt.bias", dt_rank)
    lay.vec(b + "ssm_a", dt_rank)
    if qwen35:
        lay.mat(b + "ssm_beta.weight", n_embd, dt_rank)
        lay.mat(b + "ssm_alpha.weight", n_embd, dt_rank)
    else:
        lay.mat(b + "ssm_ba.weight", n_embd, 2 * dt_rank)
    lay.vec(b + "ssm_norm.weight", d_state)
    lay.mat(b + "ssm_out.weight", value_dim, n_embd)


def synthetic_type(bits_per_weight: float, row_values: int) -> GgmlType:
    """A made-up ggml type whose block is one whole row of `row_values` values at `bits_per_weight`.

    One block per row avoids the rounding a fixed block size would add to rows that are not a multiple of it
    (gpt-oss rows are 2880 values).
    """
    block_bytes = max(1, round(bits_per_weight * row_values / 8))
    return GgmlType(-1, f"synthetic-{bits_per_weight:.2f}bpw", row_values, block_bytes)


def synth_tensors(metadata: Mapping[str, Any], file_bytes: int) -> tuple[TensorInfo, ...]:
    """Tensor infos for a model known only by its metadata and its quantized file size.

    Vectors are f32 (as every quantizer keeps them); the matrices share one effective bits-per-weight chosen
    so that the weights add up to `file_bytes` minus the header. Per-layer bytes are then right on average
    (a real Q4_K_M mixes q4_k and q6_k, so single tensors differ by a few percent).
    """
    slots = tensor_layout(metadata)
    f32 = BY_NAME["f32"]
    vector_bytes = sum(4 * _count(s.shape) for s in slots if s.role is TensorRole.VECTOR)
    matrix_values = sum(_count(s.shape) for s in slots if s.role is TensorRole.MATRIX)
    budget = max(file_bytes - HEADER_BYTES_ESTIMATE - vector_bytes, 0)
    bpw = 8 * budget / matrix_values if matrix_values else 0.0
    types: dict[int, GgmlType] = {}
    out = []
    for s in slots:
        if s.role is TensorRole.VECTOR or not s.shape:
            out.append(TensorInfo(s.name, s.shape, f32))
            continue
        row = s.shape[0]
        if row not in types:
            types[row] = synthetic_type(bpw, row)
        out.append(TensorInfo(s.name, s.shape, types[row]))
    return tuple(out)


def _count(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
