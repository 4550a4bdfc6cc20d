"""Memory of a LoRA, QLoRA or full fine-tune on one device, from a model's tensor shapes (pure).

The trainer this models is the usual Hugging Face one (transformers + peft + bitsandbytes, AdamW, bf16 autocast,
gradient checkpointing at every decoder layer). Parameters are counted from the tensor infos (MTP/nextn layers
left out); a "block matrix" is a 2-D weight of a decoder layer (attention and FFN projections), the only weights
QLoRA quantizes and LoRA adapts. Embeddings, the output head, norms and 3-D expert tensors stay bf16 and frozen
(an MoE's routed experts get no adapter, as peft's default target modules leave them).

    weights      LoRA, full: 2 bytes per parameter (bf16).
                 QLoRA: block matrices in NF4 with double quantization, 4 + 8/64 + 32/(64*256) = 4.127 bits per
                 parameter (4-bit codes; an 8-bit absmax per 64 values; an fp32 constant per 256 absmaxes: the
                 QLoRA paper, Dettmers et al. 2023, section 3); every other tensor 2 bytes.
    adapter      LoRA/QLoRA: rank r on every block matrix of shape in x out, r * (in + out) parameters, kept in fp32
                 (peft casts adapters to fp32 by default): 4 bytes each.
    gradients    4 bytes per trainable parameter (fp32).
    optimizer    AdamW's two moments, 8 bytes per trainable parameter; a full fine-tune also keeps an fp32 master
                 copy, 4 more. Full fine-tune in all: 2 + 4 + 8 + 4 = 18 bytes per parameter.
    activations  gradient checkpointing keeps each layer's input, tokens * n_embd * 2 bytes per layer, and the
                 backward pass rebuilds one layer at a time: its activations and their gradients,
                 2 * 2 bytes * tokens * (4 n_embd + 2 q + 2 kv + 4 ffn) where q = heads x head size, kv = KV heads
                 x head size, ffn = the FFN width (MoE: used experts' width + shared) - the residual, two norm
                 outputs, the second residual, Q and the attention output, K and V, gate, up, act(gate) and their
                 product. Attention scores are not stored (flash / SDPA attention).
    logits       tokens * vocab * 10 bytes: bf16 logits (2), the fp32 copy the loss takes (4), its gradient (4).
    overhead     1 GiB (CUDA context, cuBLAS workspace) + 10% of everything above (caching-allocator
                 fragmentation), the PyTorch rule of thumb.
where tokens = batch x sequence length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from hybridd.model.header import TensorInfo
from hybridd.model.spec import ModelSpec

BF16_BYTES = 2
FP32_BYTES = 4
# NF4 codes + 8-bit absmax per 64-value block + fp32 second-level constant per 256 blocks (QLoRA, section 3).
NF4_DOUBLE_QUANT_BITS = 4 + 8 / 64 + 32 / (64 * 256)
ADAMW_STATE_BYTES = 8  # two fp32 moments per trainable parameter
FULL_FINE_TUNE_BYTES_PER_PARAM = 18  # bf16 weight 2 + fp32 master 4 + fp32 gradient 4 + AdamW 8
LOGIT_BYTES_PER_VALUE = 10  # bf16 logits 2 + fp32 copy for the loss 4 + fp32 gradient 4
CONTEXT_BYTES = 1024**3  # CUDA context + cuBLAS workspace
FRAGMENTATION = 0.10  # PyTorch caching allocator: reserved beyond allocated
DEFAULT_SEQ = 2048
DEFAULT_BATCH = 1
DEFAULT_RANK = 16


class TrainMethod(StrEnum):
    """How the model is fine-tuned."""

    LORA = "lora"  # bf16 base, fp32 adapters
    QLORA = "qlora"  # NF4 base (double quantization), fp32 adapters
    FULL = "full"  # every parameter, bf16 with an fp32 master copy


@dataclass(frozen=True, slots=True)
class TrainSettings:
    """A training job's shape: method, sequence length, micro-batch, LoRA rank."""

    method: TrainMethod
    seq: int = DEFAULT_SEQ
    batch: int = DEFAULT_BATCH
    rank: int = DEFAULT_RANK

    @property
    def tokens_per_step(self) -> int:
        """Tokens one optimizer step (one micro-batch) processes."""
        return self.seq * self.batch


@dataclass(frozen=True, slots=True)
class ParameterCounts:
    """A model's parameters as training sees them."""

    block_matrix: int  # 2-D decoder-layer weights: quantized by QLoRA, adapted by LoRA
    other: int  # embeddings, output head, norms, expert tensors: bf16, frozen under LoRA
    matmul: int  # parameters a token multiplies by in a forward pass (MoE: used experts; no embedding lookup)
    adapter: int  # LoRA parameters at the settings' rank

    @property
    def total(self) -> int:
        """All parameters of the model (without adapters)."""
        return self.block_matrix + self.other


@dataclass(frozen=True, slots=True)
class TrainingEstimate:
    """Bytes a fine-tune holds on its one device, by part."""

    settings: TrainSettings
    params: ParameterCounts
    weights_bytes: int
    adapter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    logits_bytes: int
    overhead_bytes: int

    @property
    def trainable_params(self) -> int:
        """Parameters the optimizer updates."""
        return self.params.total if self.settings.method is TrainMethod.FULL else self.params.adapter

    @property
    def total_bytes(self) -> int:
        """Everything: the device must have this much usable."""
        return (self.weights_bytes + self.adapter_bytes + self.gradient_bytes + self.optimizer_bytes
                + self.activation_bytes + self.logits_bytes + self.overhead_bytes)


def _layer_index(name: str) -> int | None:
    if not name.startswith("blk."):
        return None
    index = name.split(".", 2)[1]
    return int(index) if index.isdigit() else None


def count_parameters(spec: ModelSpec, tensors: Sequence[TensorInfo], rank: int) -> ParameterCounts:
    """Block matrices, the rest, the per-token matmul parameters and the LoRA adapter's size at `rank`."""
    block = other = matmul = adapter = 0
    for tensor in tensors:
        layer = _layer_index(tensor.name)
        if layer is not None and layer >= spec.n_layer:
            continue  # MTP / nextn layers: not part of the trained trunk
        n = tensor.n_values
        if layer is not None and len(tensor.shape) == 2:
            block += n
            matmul += n
            adapter += rank * (tensor.shape[0] + tensor.shape[1])
            continue
        other += n
        if layer is not None and len(tensor.shape) == 3 and spec.n_expert > 0:
            matmul += n * spec.n_expert_used // spec.n_expert
        elif tensor.name == "output.weight":
            matmul += n
    if not any(t.name == "output.weight" for t in tensors):  # tied: the head multiplies by token_embd
        matmul += spec.n_vocab * spec.n_embd
    return ParameterCounts(block_matrix=block, other=other, matmul=matmul, adapter=adapter)


def activation_values_per_token(spec: ModelSpec) -> int:
    """Values one decoder layer keeps per token for its backward pass (see the module docstring)."""
    layers = spec.layers[: spec.n_layer] or spec.layers
    q = max((ly.n_head * ly.key_length for ly in layers), default=spec.n_embd)
    kv = max((ly.n_head_kv * (ly.key_length + ly.value_length) for ly in layers), default=0)
    ffn = max(spec.n_ff_max, spec.n_ff_exp * spec.n_expert_used + spec.n_ff_shexp)
    return 4 * spec.n_embd + 2 * q + kv + 4 * ffn


def estimate_training(spec: ModelSpec, tensors: Sequence[TensorInfo], settings: TrainSettings) -> TrainingEstimate:
    """The memory breakdown of fine-tuning `spec` with `settings` on one device."""
    params = count_parameters(spec, tensors, settings.rank)
    tokens = settings.tokens_per_step
    if settings.method is TrainMethod.QLORA:
        weights = int(params.block_matrix * NF4_DOUBLE_QUANT_BITS / 8) + params.other * BF16_BYTES
    else:
        weights = params.total * BF16_BYTES
    if settings.method is TrainMethod.FULL:
        adapter = 0
        gradients = params.total * FP32_BYTES
        optimizer = params.total * (ADAMW_STATE_BYTES + FP32_BYTES)
    else:
        adapter = params.adapter * FP32_BYTES
        gradients = params.adapter * FP32_BYTES
        optimizer = params.adapter * ADAMW_STATE_BYTES
    checkpoints = spec.n_layer * tokens * spec.n_embd * BF16_BYTES
    rebuilt_layer = 2 * BF16_BYTES * tokens * activation_values_per_token(spec)
    logits = tokens * spec.n_vocab * LOGIT_BYTES_PER_VALUE
    held = weights + adapter + gradients + optimizer + checkpoints + rebuilt_layer + logits
    return TrainingEstimate(
        settings=settings, params=params, weights_bytes=weights, adapter_bytes=adapter, gradient_bytes=gradients,
        optimizer_bytes=optimizer, activation_bytes=checkpoints + rebuilt_layer, logits_bytes=logits,
        overhead_bytes=CONTEXT_BYTES + int(FRAGMENTATION * held),
    )
