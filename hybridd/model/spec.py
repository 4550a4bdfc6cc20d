"""GGUF metadata + tensor infos -> ModelSpec: per-layer attention kind, KV geometry, recurrent state, weights (pure).

The rules follow llama.cpp's hparams loading (src/llama-model.cpp load_hparams, src/models/<arch>.cpp
load_arch_hparams, src/llama-hparams.cpp) and its memory construction (llama_model::create_memory) in the
version vendored by llama-cpp-python 0.3.36 (llama.cpp commit 0c1e570, 2026-10-01).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from hybridd.model.header import OmittedArray, TensorInfo


class AttentionKind(StrEnum):
    """What a layer keeps per token or per sequence."""

    FULL = "full"  # KV cache over the whole context
    SLIDING = "sliding"  # KV cache over a window (llama.cpp iSWA cache)
    RECURRENT = "recurrent"  # fixed-size conv + ssm state per sequence
    NONE = "none"  # nothing cached (MTP/nextn layers in the main context)


class SwaType(StrEnum):
    """llama.cpp's llama_swa_type, the shape of the sliding window."""

    NONE = "none"
    STANDARD = "standard"
    CHUNKED = "chunked"
    SYMMETRIC = "symmetric"


# Architectures whose every layer is recurrent (llm_arch_is_recurrent).
RECURRENT_ARCHS = frozenset({"mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7"})
# Hybrids whose recurrent layers come from `recurrent_layers` or `full_attention_interval` (default 4).
INTERVAL_HYBRID_ARCHS = frozenset({"qwen3next", "qwen35", "qwen35moe"})
# Other llm_arch_is_hybrid architectures: handled generically from `attention.recurrent_layers` when present.
OTHER_HYBRID_ARCHS = frozenset({"jamba", "falcon-h1", "plamo2", "granitehybrid", "lfm2", "lfm2moe", "nemotron_h",
                                "nemotron_h_moe", "kimi-linear", "bailingmoe3", "minimax-01"})
# (default pattern, dense_first, swa type) for architectures with sliding-window layers (load_swa_pattern calls).
SWA_ARCHS: dict[str, tuple[int, bool, SwaType]] = {
    "gemma2": (2, False, SwaType.STANDARD),
    "gemma3": (6, False, SwaType.STANDARD),
    "gpt-oss": (2, False, SwaType.STANDARD),
    "cohere2": (4, False, SwaType.STANDARD),
    "llama4": (4, False, SwaType.CHUNKED),
    "exaone4": (4, False, SwaType.STANDARD),
    "olmo2": (4, False, SwaType.STANDARD),
    "smallthinker": (4, True, SwaType.STANDARD),
    "afmoe": (4, False, SwaType.STANDARD),
}
# Architectures this module has rules for; others use the generic keys and get a warning.
KNOWN_ARCHS = frozenset({"llama", "qwen2", "qwen2moe", "qwen3", "qwen3moe", "deepseek2", "gpt-oss", "gemma2",
                         "gemma3", "mistral3", "phi3", "glm4", "glm4moe", "command-r", "cohere2", "starcoder2",
                         "olmo2", "exaone4", "llama4", "smallthinker", "afmoe"}
                        | RECURRENT_ARCHS | INTERVAL_HYBRID_ARCHS)

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True, slots=True)
class LayerSpec:
    """One transformer block: what it caches and what it weighs."""

    index: int
    attention: AttentionKind
    n_head: int
    n_head_kv: int
    key_length: int  # per KV head, values per token in the K cache
    value_length: int  # per KV head; the V cache may not exist (MLA)
    has_v_cache: bool
    sliding_window: int  # tokens, 0 unless SLIDING
    recurrent_conv_values: int  # llama.cpp n_embd_r: conv state values per sequence
    recurrent_ssm_values: int  # llama.cpp n_embd_s: ssm state values per sequence
    n_expert: int
    n_expert_used: int
    weight_bytes: int
    expert_bytes: int  # routed-expert tensors (the part --n-cpu-moe moves to RAM)
    n_tensors: int = 0  # weight matrices in the block: each is one matmul of a decode step, with a fixed cost
    n_expert_tensors: int = 0  # of those, the routed experts' stacks (one mul_mat_id each)

    @property
    def k_values_per_token(self) -> int:
        """K cache values per token in this layer (llama.cpp n_embd_k_gqa)."""
        return self.key_length * self.n_head_kv

    @property
    def v_values_per_token(self) -> int:
        """V cache values per token in this layer (n_embd_v_gqa), 0 when the layer has no V cache."""
        return self.value_length * self.n_head_kv if self.has_v_cache else 0

    @property
    def v_values_unpadded(self) -> int:
        """n_embd_v_gqa as llama.cpp computes it even for layers without a V cache (for the padding rule)."""
        return self.value_length * self.n_head_kv

    @property
    def active_bytes(self) -> int:
        """Weight bytes read per token: everything but the routed experts not chosen."""
        if self.n_expert <= 0 or self.expert_bytes == 0:
            return self.weight_bytes
        dense = self.weight_bytes - self.expert_bytes
        return dense + self.expert_bytes * self.n_expert_used // self.n_expert


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """What the memory estimate needs to know about a model."""

    architecture: str
    name: str
    n_layer: int  # trunk layers (block_count minus nextn/MTP layers)
    n_layer_all: int
    n_embd: int
    n_vocab: int
    n_ctx_train: int
    n_ff_max: int
    n_expert: int
    n_expert_used: int
    n_swa: int
    swa_type: SwaType
    is_mla: bool
    kv_lora_rank: int
    key_length_mla: int  # per-head Q/K length after MLA decompression, 0 unless MLA
    value_length_mla: int  # per-head V length after decompression, 0 unless MLA
    n_ff_exp: int
    n_ff_shexp: int  # shared-expert FFN width (0 when none)
    ssm_conv_kernel: int
    layers: tuple[LayerSpec, ...]
    token_embd_bytes: int  # stays in host memory in llama.cpp (input layer on CPU)
    output_bytes: int  # output.weight, or the duplicated token_embd when tied
    other_bytes: int  # output_norm, rope factors and other non-block tensors
    mtp_bytes: int  # nextn/MTP layer weights, not loaded for plain inference
    tied_embeddings: bool
    warnings: tuple[str, ...] = ()

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights llama.cpp loads for inference (token_embd, trunk layers, output)."""
        trunk = sum(layer.weight_bytes for layer in self.layers[: self.n_layer])
        return self.token_embd_bytes + trunk + self.output_bytes + self.other_bytes

    @property
    def active_bytes_per_token(self) -> int:
        """Weight bytes read to decode one token (MoE: only the used experts; embeddings: one row, ~0)."""
        trunk = sum(layer.active_bytes for layer in self.layers[: self.n_layer])
        return trunk + self.output_bytes + self.other_bytes

    @property
    def attention_layers(self) -> tuple[LayerSpec, ...]:
        """Layers with a KV cache (full or sliding)."""
        return tuple(ly for ly in self.layers if ly.attention in (AttentionKind.FULL, AttentionKind.SLIDING))

    @property
    def recurrent_layers(self) -> tuple[LayerSpec, ...]:
        """Layers with a recurrent state."""
        return tuple(ly for ly in self.layers if ly.attention is AttentionKind.RECURRENT)


class _Keys:
    """Typed access to `<arch>.<key>` metadata with llama.cpp's defaults."""

    def __init__(self, metadata: Mapping[str, Any], arch: str, warnings: list[str]) -> None:
        self.md = metadata
        self.arch = arch
        self.warnings = warnings

    def raw(self, key: str) -> Any:
        return self.md.get(f"{self.arch}.{key}")

    def _number(self, key: str, value: Any, default: int) -> int:
        # untrusted files: a non-numeric value is reported, never raised
        if isinstance(value, (bool, int, float)):
            return int(value)
        self.warnings.append(f"'{self.arch}.{key}' = {value!r} is not a number; using {default}")
        return default

    def get_int(self, key: str, default: int = 0) -> int:
        value = self.raw(key)
        if value is None or isinstance(value, (list, OmittedArray)):
            return default
        return self._number(key, value, default)

    def per_layer(self, key: str, n_layer: int, default: Sequence[int]) -> list[int]:
        """get_key_or_arr: a scalar fills every layer, an array gives one value per layer."""
        value = self.raw(key)
        if value is None or isinstance(value, OmittedArray):
            return list(default)
        if isinstance(value, list):
            values = [self._number(key, v, 0) for v in value[:n_layer]]
            return values + [0] * (n_layer - len(values))
        return [self._number(key, value, 0)] * n_layer


def _swa_pattern(value: Any, default: int, dense_first: bool, n_layer: int, n_layer_all: int) -> list[bool]:
    """llama_hparams::set_swa_pattern, or the explicit per-layer bool array when the GGUF has one."""
    if isinstance(value, list):
        flags = [bool(v) for v in value[:n_layer_all]]
        return flags + [False] * (n_layer_all - len(flags))
    n_pattern = int(value) if isinstance(value, (int, float)) else default
    flags = []
    for il in range(n_layer_all):
        if il >= n_layer:
            flags.append(False)
        elif dense_first:
            flags.append(n_pattern == 0 or il % n_pattern != 0)
        else:
            flags.append(n_pattern == 0 or il % n_pattern < n_pattern - 1)
    return flags


def _vocab_size(metadata: Mapping[str, Any], keys: _Keys, tensors: Sequence[TensorInfo]) -> int:
    if (n := keys.get_int("vocab_size")) > 0:
        return n
    tokens = metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, OmittedArray):
        return tokens.length
    if isinstance(tokens, list):
        return len(tokens)
    for t in tensors:
        if t.name in ("token_embd.weight", "output.weight") and len(t.shape) >= 2:
            return t.shape[1]
    return 0


def _recurrent_flags(arch: str, keys: _Keys, n_layer: int, n_layer_all: int,
                     warnings: list[str]) -> list[bool]:
    if arch in RECURRENT_ARCHS:
        return [True] * n_layer + [False] * (n_layer_all - n_layer)
    explicit = keys.raw("attention.recurrent_layers")
    if isinstance(explicit, list):
        flags = [bool(v) for v in explicit[:n_layer_all]]
        return flags + [False] * (n_layer_all - len(flags))
    if arch in INTERVAL_HYBRID_ARCHS:
        interval = keys.get_int("full_attention_interval", 4) or 4
        return [il < n_layer and (il + 1) % interval != 0 for il in range(n_layer_all)]
    if arch in OTHER_HYBRID_ARCHS:
        warnings.append(f"hybrid architecture {arch!r}: recurrent layers not known without "
                        f"'{arch}.attention.recurrent_layers'; every layer charged as attention")
    return [False] * n_layer_all


def _recurrent_sizes(keys: _Keys, n_embd: int) -> tuple[int, int]:
    """(n_embd_r, n_embd_s) as llama_hparams computes them (Mamba/GDN conv + ssm state, RWKV)."""
    wkv_head_size = keys.get_int("wkv.head_size")
    if wkv_head_size:
        return keys.get_int("token_shift_count", 2) * n_embd, n_embd * wkv_head_size
    d_conv = keys.get_int("ssm.conv_kernel")
    d_inner = keys.get_int("ssm.inner_size")
    d_state = keys.get_int("ssm.state_size")
    n_group = keys.get_int("ssm.group_count")
    conv = (d_conv - 1 if d_conv > 0 else 0) * (d_inner + 2 * n_group * d_state)
    return conv, d_state * d_inner


def _layer_tensor_counts(tensors: Sequence[TensorInfo], n_layer_all: int) -> tuple[list[int], list[int]]:
    """Weight matrices per block (tensors with two dimensions over 1): norms and biases are vectors, fused into
    the kernels around them. gpt-oss's per-expert biases are 2-D and so counted (3 of its 11 a block), though CUDA
    fuses them into the expert matmuls: its blocks run ops a matrix count misses (attention sinks, the clamped
    SwiGLU), and the unified class fits its Spark sweeps only with them in (without: 4 of 20 points outside 10%).
    Second list: how many of each block's matrices are routed-expert stacks (*_exps)."""
    counts = [0] * n_layer_all
    experts = [0] * n_layer_all
    for t in tensors:
        m = _BLOCK_RE.match(t.name)
        if m and int(m.group(1)) < n_layer_all and sum(1 for n in t.shape if n > 1) >= 2:
            counts[int(m.group(1))] += 1
            experts[int(m.group(1))] += "_exps." in t.name
    return counts, experts


def _layer_weights(tensors: Sequence[TensorInfo], n_layer_all: int) -> tuple[list[int], list[int], dict[str, int]]:
    weights = [0] * n_layer_all
    experts = [0] * n_layer_all
    other: dict[str, int] = {}
    for t in tensors:
        m = _BLOCK_RE.match(t.name)
        if m and int(m.group(1)) < n_layer_all:
            il = int(m.group(1))
            weights[il] += t.n_bytes
            # routed experts are stacked 3-D tensors named *_exps (shared experts are *_shexp)
            if "_exps." in t.name:
                experts[il] += t.n_bytes
        else:
            other[t.name] = other.get(t.name, 0) + t.n_bytes
    return weights, experts, other


def _shared_ffn(keys: _Keys, arch: str) -> int:
    if (width := keys.get_int("expert_shared_feed_forward_length")) > 0:
        return width
    # deepseek2 sizes its shared experts as n_ff_exp * expert_shared_count
    return keys.get_int("expert_feed_forward_length") * keys.get_int("expert_shared_count")


def model_spec(metadata: Mapping[str, Any], tensors: Sequence[TensorInfo]) -> ModelSpec:
    """The ModelSpec for a GGUF header; unknown architectures use the generic keys and record a warning."""
    warnings: list[str] = []
    arch_value = metadata.get("general.architecture", "")
    arch = arch_value if isinstance(arch_value, str) else ""
    if not arch:
        warnings.append("no general.architecture in metadata; using generic keys")
    elif arch not in KNOWN_ARCHS:
        warnings.append(f"architecture {arch!r} has no specific rules here; generic keys used")
    keys = _Keys(metadata, arch, warnings)

    n_layer_all = keys.get_int("block_count")
    if n_layer_all <= 0:
        warnings.append(f"missing or zero '{arch}.block_count'")
        n_layer_all = 0
    n_nextn = min(keys.get_int("nextn_predict_layers"), n_layer_all)
    n_layer = n_layer_all - n_nextn
    n_embd = keys.get_int("embedding_length")
    n_head = keys.per_layer("attention.head_count", n_layer_all, [0] * n_layer_all)
    n_head_kv = keys.per_layer("attention.head_count_kv", n_layer_all, n_head)
    n_ff = keys.per_layer("feed_forward_length", n_layer_all, [0] * n_layer_all)
    n_head0 = n_head[0] if n_head else 0
    head_k = keys.get_int("attention.key_length", n_embd // n_head0 if n_head0 else 0)
    head_v = keys.get_int("attention.value_length", n_embd // n_head0 if n_head0 else 0)
    head_k_swa = keys.get_int("attention.key_length_swa", head_k)
    head_v_swa = keys.get_int("attention.value_length_swa", head_v)
    is_mla = keys.get_int("attention.key_length_mla") > 0 and keys.get_int("attention.value_length_mla") > 0

    n_expert = keys.get_int("expert_count")
    n_expert_used = keys.per_layer("expert_used_count", n_layer_all, [0] * n_layer_all)
    n_dense_lead = keys.get_int("leading_dense_block_count")

    # sliding window
    n_swa = keys.get_int("attention.sliding_window")
    swa_type = SwaType.NONE
    is_swa = [False] * n_layer_all
    if arch in SWA_ARCHS and (n_swa > 0 or arch == "gpt-oss"):
        default, dense_first, swa_type = SWA_ARCHS[arch]
        is_swa = _swa_pattern(keys.raw("attention.sliding_window_pattern"), default, dense_first,
                              n_layer, n_layer_all)
    elif n_swa > 0 and arch not in SWA_ARCHS:
        warnings.append(f"'{arch}.attention.sliding_window' = {n_swa} ignored: llama.cpp applies "
                        "no sliding window to this architecture")
        n_swa = 0
    if swa_type is not SwaType.NONE and not any(is_swa):
        swa_type = SwaType.NONE

    is_recr = _recurrent_flags(arch, keys, n_layer, n_layer_all, warnings)
    conv_values, ssm_values = _recurrent_sizes(keys, n_embd) if any(is_recr) else (0, 0)
    hybrid = arch in INTERVAL_HYBRID_ARCHS or arch in OTHER_HYBRID_ARCHS

    weights, expert_bytes, other = _layer_weights(tensors, n_layer_all)
    tensor_counts, expert_tensor_counts = _layer_tensor_counts(tensors, n_layer_all)
    token_embd = other.pop("token_embd.weight", 0)
    tied = "output.weight" not in other
    output = other.pop("output.weight", token_embd)
    other_bytes = sum(other.values())
    if not tensors:
        warnings.append("no tensor infos: weight sizes are zero")

    layers = []
    for il in range(n_layer_all):
        if il >= n_layer:
            kind = AttentionKind.NONE  # nextn/MTP layers are filtered out of the main context's memory
        elif is_recr[il]:
            kind = AttentionKind.RECURRENT
        elif arch in RECURRENT_ARCHS or (n_head_kv[il] == 0 and not hybrid):
            kind = AttentionKind.NONE
        else:
            kind = AttentionKind.SLIDING if is_swa[il] else AttentionKind.FULL
        swa = is_swa[il]
        layers.append(LayerSpec(
            index=il,
            attention=kind,
            n_head=n_head[il],
            n_head_kv=n_head_kv[il],
            key_length=head_k_swa if swa else head_k,
            value_length=head_v_swa if swa else head_v,
            has_v_cache=not is_mla,
            sliding_window=n_swa if kind is AttentionKind.SLIDING else 0,
            recurrent_conv_values=conv_values if kind is AttentionKind.RECURRENT else 0,
            recurrent_ssm_values=ssm_values if kind is AttentionKind.RECURRENT else 0,
            n_expert=n_expert if il >= n_dense_lead else 0,
            n_expert_used=n_expert_used[il] if il >= n_dense_lead else 0,
            weight_bytes=weights[il],
            expert_bytes=expert_bytes[il],
            n_tensors=tensor_counts[il],
            n_expert_tensors=expert_tensor_counts[il],
        ))

    mtp_bytes = sum(weights[n_layer:])
    return ModelSpec(
        architecture=arch,
        name=str(metadata.get("general.name", "")),
        n_layer=n_layer,
        n_layer_all=n_layer_all,
        n_embd=n_embd,
        n_vocab=_vocab_size(metadata, keys, tensors),
        n_ctx_train=keys.get_int("context_length"),
        n_ff_max=max(n_ff, default=0),
        n_expert=n_expert,
        n_expert_used=max(n_expert_used, default=0),
        n_swa=n_swa,
        swa_type=swa_type,
        is_mla=is_mla,
        kv_lora_rank=keys.get_int("attention.kv_lora_rank"),
        key_length_mla=keys.get_int("attention.key_length_mla") if is_mla else 0,
        value_length_mla=keys.get_int("attention.value_length_mla") if is_mla else 0,
        n_ff_exp=max(keys.per_layer("expert_feed_forward_length", n_layer_all, [0] * n_layer_all), default=0),
        n_ff_shexp=_shared_ffn(keys, arch),
        ssm_conv_kernel=keys.get_int("ssm.conv_kernel"),
        layers=tuple(layers),
        token_embd_bytes=token_embd,
        output_bytes=output,
        other_bytes=other_bytes,
        mtp_bytes=mtp_bytes,
        tied_embeddings=tied,
        warnings=tuple(warnings),
    )
