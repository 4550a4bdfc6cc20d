"""ModelSpec + RunSettings -> MemoryEstimate: weights, KV, recurrent state, compute, output, reserve (pure).

Sizes follow llama.cpp (commit 0c1e570, vendored by llama-cpp-python 0.3.36):
- context: n_ctx padded to 256; per sequence n_ctx_seq = pad(n_ctx / n_seq, 256) unless kv_unified
  (llama_context ctor). KV tensors are [n_embd_k_gqa, n_ctx_seq, n_stream] with n_stream = 1 when unified,
  else n_seq (llama_kv_cache ctor), so the K-cache rows use exact ggml block sizes.
- sliding-window layers: pad(min(n_ctx_seq, n_swa * (n_seq if unified else 1) + n_ubatch), 256) cells,
  or n_ctx_seq with swa_full (llama_kv_cache_iswa ctor).
- MLA caches K only (kv_lora_rank + rope dims, one KV head); without flash attention V is stored transposed and
  padded to the largest layer's V width ([TAG_V_CACHE_VARIABLE]).
- recurrent layers: f32 conv (n_embd_r) + ssm (n_embd_s) state per sequence (llama_memory_recurrent).
- compute buffer: the worst-case ubatch graph (n_tokens = min(n_ctx, n_ubatch)); modelled as the inputs
  live for the whole graph (KQ masks, residual stream) plus the largest per-layer working set: attention
  scores n_kv x n_tokens x n_head f32 without flash attention, the FFN/MoE activations, or the logits.
  Checked against llama.cpp's reported sizes on architecture twins (tests/test_twins.py) within 15%.
- compute buffer per GPU of a layer split (device_compute_bytes): llama_context::sched_reserve reserves the
  pp graph once per backend; each GPU's buffer holds the split inputs it copies from other backends (the KQ
  masks and positions made on the CPU, the hidden state from the CPU's embedding lookup or the previous GPU),
  its layers' working set, and on the GPU with the output layer the logits (n_vocab x n_outputs f32,
  n_outputs = min(n_ubatch, n_outputs_max): llama-cpp-python leaves n_outputs_max at n_batch, llama-server
  sets it to its slots, as an H200 run shows: 70 MiB of compute buffer where 512 rows of logits are 251 MiB).
  With more than one GPU, every layer offloaded, -sm layer, offload_kqv and no tensor overrides (-ot /
  --n-cpu-moe), llama_context turns on pipeline parallelism and ggml_backend_sched keeps GGML_SCHED_MAX_COPIES
  = 4 copies of every split input (ggml-backend.cpp, pass 5: "create a copy of the input in the split's
  backend", flagged input+output so ggml-alloc never reuses them): the masks count four times on each GPU
  (unsloth PR #7637 found the same: Kimi-K3 at 1M context on 4 GPUs, 4.0 GiB of masks per device).
  CUDA flash attention that cannot read a quantized cache directly (the MMA/tile kernels, MLA's 576/512 heads)
  converts K (and V unless it is a view of K) to F16 inside the FA node's own allocation
  (fattn.cu ggml_cuda_flash_attn_ext_get_alloc_size), so that copy is part of each GPU's compute buffer.
- CUDA runtime per GPU (RunSettings.runtime_reserve_bytes): what a process holds on a GPU beyond ggml's
  buffers. The primary context scales with the SM count: 107 MiB on an RTX 4060 Ti (34 SMs) and 555 MiB on an
  RTX PRO 6000 (188 SMs), measured with cudaMemGetInfo in llama.cpp PR #23604, so about 2.9 MiB per SM and
  384 MiB for a 128-SM RTX 4090; llama.cpp PR #20595 gives 120-550 MB over GPUs. On top: the ggml-cuda and
  cuBLAS/cuBLASLt kernels loaded lazily on first use, the cuBLAS workspace (4 MiB before Hopper, 32 MiB from
  sm_90, cuBLAS docs cublasSetWorkspace) and the CUDA memory pool's high-water mark (VMM pool, 2 MiB
  granularity: MMQ's q8_1 activations and MoE id buffers, a few MiB at n_ubatch 512). Issue #21692 puts a
  llama-server process's own context at more than 700 MB. The big-GPU figure is charged to every GPU:
  conservative on small ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from hybridd.model.ggml_types import BY_NAME, GgmlType, ggml_type, row_bytes
from hybridd.model.spec import AttentionKind, LayerSpec, ModelSpec

MIB = 1024 * 1024
# llama.cpp pads n_ctx, n_ctx_seq and the SWA cache to 256 cells.
CTX_PAD = 256
F32 = 4
# CUDA runtime per GPU (see the module docstring for the sources): primary context of a 128-SM GPU, the lazily
# loaded ggml-cuda and cuBLAS kernels, the cuBLAS workspace and the memory pool's high-water mark.
CUDA_CONTEXT_BYTES = 384 * MIB
CUDA_KERNEL_MODULES_BYTES = 256 * MIB
CUBLAS_WORKSPACE_BYTES = 32 * MIB
CUDA_POOL_BYTES = 64 * MIB
DEFAULT_RUNTIME_RESERVE = CUDA_CONTEXT_BYTES + CUDA_KERNEL_MODULES_BYTES + CUBLAS_WORKSPACE_BYTES + CUDA_POOL_BYTES
# ggml-backend.cpp GGML_SCHED_MAX_COPIES: split inputs kept per backend when pipeline parallelism is on
SCHED_MAX_COPIES = 4
DEFAULT_CTX = 4096
# Gated-DeltaNet architectures whose graph runs llama.cpp's fused GDN op on V heads tiled in the file (no repeat of
# q/k to the value heads): their recurrent block peaks differently from qwen3next's.
FUSED_GDN_ARCHS = frozenset({"qwen35", "qwen35moe"})


def engine_outputs(engine: str | None, slots: int, every_row: bool = False) -> int:
    """RunSettings.n_outputs for an engine kind: llama-server reserves one output a slot, llama-cpp-python (and
    an engine not known) n_batch. `every_row`: the engine outputs more than the next token (llama-server with
    embeddings or pooling reserves n_batch rows, with speculative decoding 1 + n_draft a slot), so n_batch."""
    return max(1, slots) if engine == "llama-server" and not every_row else 0


def pad(value: int, multiple: int) -> int:
    """GGML_PAD: round up to a multiple."""
    return -(-value // multiple) * multiple


@dataclass(frozen=True, slots=True)
class RunSettings:
    """How llama.cpp would be run: context, slots, cache types, batch sizes (llama.cpp's defaults)."""

    ctx: int = DEFAULT_CTX
    n_seq: int = 1  # parallel slots (llama.cpp n_seq_max / llama-server --parallel)
    kv_unified: bool = False
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: bool = True  # llama.cpp's "auto" enables it on CUDA for these architectures
    n_batch: int = 2048
    n_ubatch: int = 512
    swa_full: bool = False
    offload_kqv: bool = True
    # output rows the worst-case graph reserves logits for (llama_context_params.n_outputs_max): 0 = n_batch, as
    # llama-cpp-python runs it; llama-server reserves one per slot (--parallel)
    n_outputs: int = 0
    backend: str = "cuda"  # "cuda" adds the F16 copies flash attention makes of a quantized cache
    runtime_reserve_bytes: int = DEFAULT_RUNTIME_RESERVE  # per GPU: CUDA context and allocator slack

    def __post_init__(self) -> None:
        if self.ctx <= 0:
            raise ValueError(f"ctx must be positive, got {self.ctx}")
        if self.n_seq <= 0:
            raise ValueError(f"n_seq must be positive, got {self.n_seq}")
        if self.n_batch <= 0 or self.n_ubatch <= 0:
            raise ValueError("n_batch and n_ubatch must be positive")
        if self.n_outputs < 0:
            raise ValueError(f"n_outputs must be 0 (n_batch) or positive, got {self.n_outputs}")
        ggml_type(self.type_k)
        ggml_type(self.type_v)


@dataclass(frozen=True, slots=True)
class ContextGeometry:
    """The context sizes llama.cpp derives from the settings."""

    n_ctx: int  # padded total context
    n_ctx_seq: int  # cells per stream of a full-attention layer
    n_stream: int  # 1 when unified, else one stream per sequence
    n_ubatch: int  # tokens in the worst-case graph (min of n_ctx, n_batch, n_ubatch)
    swa_cells: int  # cells per stream of a sliding-window layer (0 when none)


class LayerMemory(NamedTuple):
    """Bytes one layer needs (a NamedTuple: immutable and cheap to build, one per layer per estimate)."""

    layer_index: int
    attention: AttentionKind
    weight_bytes: int
    expert_bytes: int
    kv_bytes: int
    k_bytes: int
    v_bytes: int
    recurrent_bytes: int
    cells: int  # KV cells per stream (0 for layers without a KV cache)


@dataclass(frozen=True, slots=True)
class MemoryEstimate:
    """Every part of the memory a model needs at some settings, in bytes."""

    settings: RunSettings
    geometry: ContextGeometry
    layers: tuple[LayerMemory, ...]
    token_embd_bytes: int  # host memory: llama.cpp keeps the input layer on the CPU
    output_weight_bytes: int  # output matrix + output norm, placed on the last GPU
    compute_bytes: int  # graph scratch of one backend running every layer (llama.cpp's CPU compute buffer)
    fa_copy_bytes: int  # CUDA: F16 copies of a quantized cache made inside a flash-attention node
    output_buffer_bytes: int  # host logits buffer (n_vocab x n_seq f32)
    runtime_reserve_bytes: int  # per GPU: CUDA context, kernels, cuBLAS workspace, pool
    graph_input_bytes: int = 0  # KQ masks and positions: made on the CPU, copied to every GPU
    hidden_bytes: int = 0  # the hidden state a GPU receives (n_embd x n_ubatch f32)
    graph_base_bytes: int = 0  # residual stream, its normalised copy, the block output
    layer_peak_bytes: int = 0  # largest working set of one layer (attention, FFN/MoE or recurrent block)
    logits_bytes: int = 0  # output layer's working set: logits + last hidden state
    notes: tuple[str, ...] = field(default=())

    @property
    def layer_weight_bytes(self) -> int:
        """Weights of the trunk layers."""
        return sum(ly.weight_bytes for ly in self.layers)

    @property
    def weights_bytes(self) -> int:
        """All weights llama.cpp loads: token embeddings, layers, output."""
        return self.token_embd_bytes + self.layer_weight_bytes + self.output_weight_bytes

    @property
    def kv_bytes(self) -> int:
        """K and V caches of all attention layers."""
        return sum(ly.kv_bytes for ly in self.layers)

    @property
    def recurrent_bytes(self) -> int:
        """Recurrent (conv + ssm) state of all recurrent layers."""
        return sum(ly.recurrent_bytes for ly in self.layers)

    @property
    def total_compute_bytes(self) -> int:
        """Compute buffer plus the flash-attention cache copies."""
        return self.compute_bytes + self.fa_copy_bytes

    def device_compute_bytes(self, n_copies: int = 1, holds_output: bool = True) -> int:
        """One GPU's compute buffer in a layer split: its copies of the split inputs, the residual stream, and the
        larger of its layers' working set (with the flash-attention F16 copy) and, on the GPU with the output
        layer, the logits."""
        inputs = n_copies * (self.graph_input_bytes + self.hidden_bytes)
        return inputs + self.graph_base_bytes + max(self.layer_peak_bytes + self.fa_copy_bytes,
                                                    self.logits_bytes if holds_output else 0)

    @property
    def total_bytes(self) -> int:
        """Everything: weights, caches, compute, output buffer and one runtime reserve."""
        return (self.weights_bytes + self.kv_bytes + self.recurrent_bytes + self.total_compute_bytes
                + self.output_buffer_bytes + self.runtime_reserve_bytes)


def context_geometry(spec: ModelSpec, settings: RunSettings) -> ContextGeometry:
    """n_ctx, n_ctx_seq, streams and SWA cells exactly as llama_context and llama_kv_cache_iswa compute them."""
    n_ctx = pad(settings.ctx, CTX_PAD)
    if settings.kv_unified:
        n_ctx_seq, n_stream = n_ctx, 1
    else:
        n_ctx_seq, n_stream = pad(n_ctx // settings.n_seq, CTX_PAD), settings.n_seq
        n_ctx = n_ctx_seq * settings.n_seq
    # causal attention: the batch is limited by the context
    n_batch = min(n_ctx, settings.n_batch)
    n_ubatch = min(n_batch, settings.n_ubatch)
    swa_cells = 0
    if spec.n_swa > 0 and any(ly.attention is AttentionKind.SLIDING for ly in spec.layers):
        if settings.swa_full:
            swa_cells = n_ctx_seq
        else:
            per_stream = spec.n_swa * (settings.n_seq if settings.kv_unified else 1) + n_ubatch
            swa_cells = pad(min(n_ctx_seq, per_stream), CTX_PAD)
    return ContextGeometry(n_ctx, n_ctx_seq, n_stream, n_ubatch, swa_cells)


def _cache_bytes(layer: LayerSpec, settings: RunSettings, geo: ContextGeometry,
                 type_k: GgmlType, type_v: GgmlType, v_width_max: int) -> tuple[int, int, int, int]:
    """(k_bytes, v_bytes, recurrent_bytes, cells) of one layer."""
    cells = 0
    k_bytes = v_bytes = recurrent = 0
    if layer.attention is AttentionKind.FULL:
        cells = geo.n_ctx_seq
    elif layer.attention is AttentionKind.SLIDING:
        cells = geo.swa_cells
    if cells:
        k_bytes = row_bytes(type_k, layer.k_values_per_token) * cells * geo.n_stream
        # without flash attention V is stored transposed and padded to the widest layer (all layers)
        v_width = 0 if not layer.has_v_cache else (
            layer.v_values_per_token if settings.flash_attn else v_width_max)
        v_bytes = row_bytes(type_v, v_width) * cells * geo.n_stream if v_width else 0
    if layer.attention is AttentionKind.RECURRENT:
        # one state row per sequence (mem_size = max(1, n_seq_max)); f32 conv and ssm state
        recurrent = (layer.recurrent_conv_values + layer.recurrent_ssm_values) * F32 * max(1, settings.n_seq)
    return k_bytes, v_bytes, recurrent, cells


def _shape_key(layer: LayerSpec) -> tuple[object, ...]:
    # layers of one model repeat a handful of shapes; sizes are computed once per shape
    return (layer.attention, layer.n_head, layer.n_head_kv, layer.key_length, layer.value_length,
            layer.has_v_cache, layer.recurrent_conv_values, layer.recurrent_ssm_values)


def _attention_peak(spec: ModelSpec, layer: LayerSpec, cells: int, geo: ContextGeometry, flash_attn: bool) -> int:
    """Bytes of the attention block's chain of activations for one layer in the worst-case ubatch."""
    t = geo.n_ubatch
    n_head = layer.n_head
    q = layer.key_length * n_head * t * F32
    o = layer.value_length * n_head * t * F32
    extra = 0
    q_chain = 0
    if spec.is_mla:
        # Q is built in the MLA head dim, absorbed into the latent space, then concatenated with the rope part;
        # the attention output is decompressed back with v_b
        q_pre = spec.key_length_mla * n_head * t * F32
        q_abs = spec.kv_lora_rank * n_head * t * F32
        q_chain = q_pre + q_abs + q
        extra = spec.value_length_mla * n_head * t * F32
    if flash_attn:
        return max(q + o + extra, q_chain)
    kq = cells * t * n_head * F32  # softmax runs in place on it
    return max(kq + q + 2 * o + extra, q_chain)


def _ffn_peak(spec: ModelSpec, geo: ContextGeometry) -> int:
    t = geo.n_ubatch
    dense = 3 * spec.n_ff_max * t * F32
    moe = 0
    if spec.n_expert > 0:
        n_used = max(spec.n_expert_used, 1)
        moe = (3 * spec.n_ff_exp * n_used + spec.n_embd * n_used + 3 * spec.n_expert) * t * F32
        moe += 3 * spec.n_ff_shexp * t * F32
    return max(dense, moe)


def _recurrent_peak(spec: ModelSpec, geo: ContextGeometry, settings: RunSettings) -> int:
    """Gated-DeltaNet/Mamba block: projected qkv, conv input and output, plus the states of every sequence."""
    peak = 0
    n_seq = max(1, settings.n_seq)
    for ly in spec.recurrent_layers:
        channels = ly.recurrent_conv_values // max(spec.ssm_conv_kernel - 1, 1)
        act = channels * geo.n_ubatch * F32
        state = ly.recurrent_ssm_values * F32
        if spec.architecture in FUSED_GDN_ARCHS:
            # three channel-wide activations (projected qkv, conv input, conv output) at one or two sequences;
            # from about four on, the gathered and the updated states of every sequence outgrow that. Fitted to
            # llama.cpp's reserve over ssm geometries at 1-16 sequences: within 15% throughout.
            peak = max(peak, 3 * act, 5 * act // 2 + 2 * state * n_seq)
        else:
            # qwen3next repeats q/k to the value heads; half of the gate z (value_dim, about channels / 2) is
            # live beside them on average
            peak = max(peak, 3 * act + channels // 4 * geo.n_ubatch * F32 + state * n_seq)
    return peak


class _GraphParts(NamedTuple):
    inputs: int
    base: int
    layer_peak: int
    logits: int

    @property
    def single_backend(self) -> int:
        return self.inputs + self.base + max(self.layer_peak, self.logits)


def _graph_parts(spec: ModelSpec, shapes: list[tuple[LayerSpec, int]], settings: RunSettings,
                 geo: ContextGeometry) -> _GraphParts:
    t = geo.n_ubatch
    fa = settings.flash_attn
    mask_elem = 2 if fa else F32  # flash attention takes an f16 mask
    masks = 0
    if any(ly.attention is AttentionKind.FULL for ly in spec.layers):
        masks += geo.n_ctx_seq * t * mask_elem
    if geo.swa_cells:
        masks += geo.swa_cells * t * mask_elem
    # residual stream, its normalised copy and the block output (3 x n_embd: fitted on qwen2, where n_embd is
    # as wide as the attention)
    base = 3 * spec.n_embd * t * F32
    attn = max((_attention_peak(spec, ly, cells, geo, fa) for ly, cells in shapes if cells), default=0)
    outputs = min(t, settings.n_outputs) if settings.n_outputs > 0 else t
    logits = (spec.n_vocab + spec.n_embd) * outputs * F32
    return _GraphParts(masks, base, max(attn, _ffn_peak(spec, geo), _recurrent_peak(spec, geo, settings)), logits)


def _fa_copy_bytes(shapes: list[tuple[LayerSpec, int]], settings: RunSettings, geo: ContextGeometry,
                   type_k: GgmlType, type_v: GgmlType) -> int:
    """CUDA flash attention converts a quantized K/V view to F16 for prompt processing (one layer at a time)."""
    if settings.backend != "cuda" or not settings.flash_attn:
        return 0
    f16 = BY_NAME["f16"]
    worst = 0
    for ly, cells in shapes:
        if not cells:
            continue
        size = 0
        if type_k.block_size > 1:
            size += row_bytes(f16, ly.k_values_per_token) * cells * geo.n_stream
        if type_v.block_size > 1 and ly.has_v_cache:
            size += row_bytes(f16, ly.v_values_per_token) * cells * geo.n_stream
        worst = max(worst, size)
    return worst


def pipeline_copies(n_gpus: int, all_layers_on_gpus: bool, tensor_overrides: bool = False) -> int:
    """Copies of each split input ggml_backend_sched keeps: llama_context enables pipeline parallelism with more
    than one GPU, every layer offloaded (-sm layer, offload_kqv) and no tensor overrides (--n-cpu-moe is one)."""
    return SCHED_MAX_COPIES if n_gpus > 1 and all_layers_on_gpus and not tensor_overrides else 1


def estimate_memory(spec: ModelSpec, settings: RunSettings) -> MemoryEstimate:
    """Bytes for every part of running `spec` under `settings` in llama.cpp."""
    type_k = ggml_type(settings.type_k)
    type_v = ggml_type(settings.type_v)
    geo = context_geometry(spec, settings)
    trunk = spec.layers[: spec.n_layer]
    v_width_max = max((ly.v_values_unpadded for ly in spec.layers), default=0)
    sizes: dict[tuple[object, ...], tuple[int, int, int, int]] = {}
    shapes: list[tuple[LayerSpec, int]] = []
    layers = []
    for ly in trunk:
        key = _shape_key(ly)
        size = sizes.get(key)
        if size is None:
            size = sizes[key] = _cache_bytes(ly, settings, geo, type_k, type_v, v_width_max)
            shapes.append((ly, size[3]))
        k_bytes, v_bytes, recurrent, cells = size
        layers.append(LayerMemory(ly.index, ly.attention, ly.weight_bytes, ly.expert_bytes,
                                  k_bytes + v_bytes, k_bytes, v_bytes, recurrent, cells))
    notes = list(spec.warnings)
    if not settings.flash_attn and (type_v.block_size > 1 or (spec.is_mla and type_k.block_size > 1)):
        notes.append("llama.cpp refuses a quantized V cache without flash attention"
                     + (" (MLA's V is a view of K)" if spec.is_mla else ""))
    if settings.ctx > spec.n_ctx_train > 0:
        notes.append(f"ctx {settings.ctx} exceeds the trained context {spec.n_ctx_train}")
    graph = _graph_parts(spec, shapes, settings, geo)
    return MemoryEstimate(
        settings=settings,
        geometry=geo,
        layers=tuple(layers),
        token_embd_bytes=spec.token_embd_bytes,
        output_weight_bytes=spec.output_bytes + spec.other_bytes,
        compute_bytes=graph.single_backend,
        fa_copy_bytes=_fa_copy_bytes(shapes, settings, geo, type_k, type_v),
        output_buffer_bytes=spec.n_vocab * max(1, settings.n_seq) * F32,
        runtime_reserve_bytes=settings.runtime_reserve_bytes if settings.backend == "cuda" else 0,
        graph_input_bytes=graph.inputs,
        hidden_bytes=spec.n_embd * geo.n_ubatch * F32,
        graph_base_bytes=graph.base,
        layer_peak_bytes=graph.layer_peak,
        logits_bytes=graph.logits,
        notes=tuple(notes),
    )
