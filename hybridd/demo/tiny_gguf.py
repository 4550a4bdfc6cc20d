"""Write tiny but real llama-architecture GGUF models: random weights, byte-level vocabulary.

They load and run in llama.cpp in milliseconds, which makes them the test fixture and the demo fallback
when no real model is installed. Head dims are a multiple of 32 so quantized (q8_0, q4_0) KV caches work.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import gguf

# A plain ChatML template: llama-cpp-python applies the GGUF's template, so chat works like a real model.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TinyLlama:
    """Shape of a tiny llama model; the defaults load in a few milliseconds."""

    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 2
    n_head_kv: int = 1
    n_ff: int = 128
    n_ctx_train: int = 4096
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def byte_vocab() -> tuple[list[str], list[float], list[int]]:
    """SentencePiece-style vocabulary: <unk>, <s>, </s>, then one token per byte."""
    import gguf

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    scores = [0.0] * len(tokens)
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256
    return tokens, scores, [int(t) for t in types]


def write_tiny_llama(path: Path, shape: TinyLlama = TinyLlama(), name: str = "tiny-llama") -> Path:
    """Write a tiny llama GGUF to path and return the path."""
    import gguf
    import numpy as np

    if shape.head_dim % 32:
        raise ValueError(f"head_dim {shape.head_dim} must be a multiple of 32 for quantized KV caches")
    rng = np.random.default_rng(shape.seed)
    tokens, scores, types = byte_vocab()
    n_vocab = len(tokens)
    n_embd_kv = shape.head_dim * shape.n_head_kv

    def weight(*dims: int) -> np.ndarray:
        # numpy shape is the reverse of ggml's ne[]: (rows, cols) = (out, in).
        return (rng.standard_normal(dims) * 0.02).astype(np.float32)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_block_count(shape.n_layer)
    writer.add_context_length(shape.n_ctx_train)
    writer.add_embedding_length(shape.n_embd)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    add_byte_tokenizer(writer, tokens, scores, types)
    writer.add_add_bos_token(True)
    writer.add_chat_template(CHAT_TEMPLATE)
    # Mean pooling makes /v1/embeddings return one vector per input (llama.cpp's default, none, gives one per token).
    writer.add_pooling_type(gguf.PoolingType.MEAN)

    writer.add_tensor("token_embd.weight", weight(n_vocab, shape.n_embd))
    for i in range(shape.n_layer):
        blk = f"blk.{i}"
        writer.add_tensor(f"{blk}.attn_norm.weight", ones(shape.n_embd))
        writer.add_tensor(f"{blk}.attn_q.weight", weight(shape.n_embd, shape.n_embd))
        writer.add_tensor(f"{blk}.attn_k.weight", weight(n_embd_kv, shape.n_embd))
        writer.add_tensor(f"{blk}.attn_v.weight", weight(n_embd_kv, shape.n_embd))
        writer.add_tensor(f"{blk}.attn_output.weight", weight(shape.n_embd, shape.n_embd))
        writer.add_tensor(f"{blk}.ffn_norm.weight", ones(shape.n_embd))
        writer.add_tensor(f"{blk}.ffn_gate.weight", weight(shape.n_ff, shape.n_embd))
        writer.add_tensor(f"{blk}.ffn_up.weight", weight(shape.n_ff, shape.n_embd))
        writer.add_tensor(f"{blk}.ffn_down.weight", weight(shape.n_embd, shape.n_ff))
    writer.add_tensor("output_norm.weight", ones(shape.n_embd))
    writer.add_tensor("output.weight", weight(n_vocab, shape.n_embd))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def add_byte_tokenizer(writer: gguf.GGUFWriter, tokens: list[str], scores: list[float], types: list[int]) -> None:
    """A llama-style tokenizer over a byte vocabulary: <unk> 0, <s> 1, </s> 2, then the bytes."""
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)


def add_metadata(writer: gguf.GGUFWriter, metadata: Mapping[str, Any]) -> None:
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
