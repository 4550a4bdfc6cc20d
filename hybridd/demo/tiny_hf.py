"""A tiny Llama as a Hugging Face checkpoint, built in code: the fine-tuning fixture, and its matching GGUF.

Random weights from a fixed seed (numpy, written as safetensors: no torch needed to build it), a byte-level BPE
tokenizer (GPT-2's byte alphabet, one merge: llama.cpp refuses a BPE vocabulary with none) built with `tokenizers`,
and a ChatML template. The GGUF comes from hybridd.jobs.gguf_export, so fixture and exporter are tested together.
Building it needs `tokenizers` and `safetensors` (both in the `train` extra), imported when called.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hybridd.demo.tiny_gguf import CHAT_TEMPLATE
from hybridd.jobs.gguf_export import export_model_gguf

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
MERGES = (("h", "e"),)
SPM_MERGES = (("\u2581", "t"), ("h", "e"), ("\u2581t", "he"), ("l", "l"), ("ll", "o"))


@dataclass(frozen=True)
class TinyHfLlama:
    """Shape of the tiny checkpoint; head_dim is 32 so quantized KV caches work in llama.cpp."""

    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 2
    n_head_kv: int = 1
    n_ff: int = 128
    n_ctx_train: int = 4096
    seed: int = 0
    tokenizer: str = "bpe"  # "bpe": byte-level, GPT-2 style; "spm": SentencePiece style (▁ for spaces, byte fallback)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each byte value, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars: dict[int, str] = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _tokenizer_files(folder: Path, kind: str) -> int:
    """Write tokenizer.json and tokenizer_config.json; return the vocabulary size."""
    from tokenizers import AddedToken

    tokenizer = _spm_tokenizer() if kind == "spm" else _bpe_tokenizer()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "add_bos_token": False, "add_eos_token": False, "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return int(tokenizer.get_vocab_size())


def _bpe_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(byte_alphabet())}
    for left, right in MERGES:
        vocab[left + right] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=list(MERGES)))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _spm_tokenizer() -> Any:
    """Llama 2's shape: <unk>, 256 byte tokens, ▁ and a few letters, merges; spaces become ▁, one put in front."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {"<unk>": 0} | {f"<0x{b:02X}>": 1 + b for b in range(256)}
    for piece in ["\u2581", *"ehlot", *(a + b for a, b in SPM_MERGES)]:
        vocab.setdefault(piece, len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=list(SPM_MERGES), unk_token="<unk>", byte_fallback=True,
                                     fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                                 normalizers.Replace(" ", "\u2581")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    return tokenizer


def write_tiny_hf_llama(folder: Path, shape: TinyHfLlama = TinyHfLlama()) -> Path:
    """Write a tiny Llama HF checkpoint (config.json, model.safetensors, tokenizer) into folder; return folder."""
    import numpy as np
    from safetensors.numpy import save_file

    if shape.head_dim % 32:
        raise ValueError(f"head_dim {shape.head_dim} must be a multiple of 32 for quantized KV caches")
    if shape.tokenizer not in ("bpe", "spm"):
        raise ValueError(f"tokenizer {shape.tokenizer!r} (valid: bpe, spm)")
    folder.mkdir(parents=True, exist_ok=True)
    n_vocab = _tokenizer_files(folder, shape.tokenizer)
    ids = {t: n_vocab - len(SPECIAL_TOKENS) + i for i, t in enumerate(SPECIAL_TOKENS)}
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": n_vocab,
        "hidden_size": shape.n_embd, "intermediate_size": shape.n_ff, "num_hidden_layers": shape.n_layer,
        "num_attention_heads": shape.n_head, "num_key_value_heads": shape.n_head_kv, "head_dim": shape.head_dim,
        "max_position_embeddings": shape.n_ctx_train, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
        "initializer_range": 0.02, "torch_dtype": "float32",
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))

    rng = np.random.default_rng(shape.seed)
    n_kv = shape.head_dim * shape.n_head_kv

    def weight(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)

    tensors = {"model.embed_tokens.weight": weight(n_vocab, shape.n_embd)}
    for i in range(shape.n_layer):
        layer = f"model.layers.{i}"
        tensors[f"{layer}.input_layernorm.weight"] = np.ones(shape.n_embd, dtype=np.float32)
        tensors[f"{layer}.self_attn.q_proj.weight"] = weight(shape.n_embd, shape.n_embd)
        tensors[f"{layer}.self_attn.k_proj.weight"] = weight(n_kv, shape.n_embd)
        tensors[f"{layer}.self_attn.v_proj.weight"] = weight(n_kv, shape.n_embd)
        tensors[f"{layer}.self_attn.o_proj.weight"] = weight(shape.n_embd, shape.n_embd)
        tensors[f"{layer}.post_attention_layernorm.weight"] = np.ones(shape.n_embd, dtype=np.float32)
        tensors[f"{layer}.mlp.gate_proj.weight"] = weight(shape.n_ff, shape.n_embd)
        tensors[f"{layer}.mlp.up_proj.weight"] = weight(shape.n_ff, shape.n_embd)
        tensors[f"{layer}.mlp.down_proj.weight"] = weight(shape.n_embd, shape.n_ff)
    tensors["model.norm.weight"] = np.ones(shape.n_embd, dtype=np.float32)
    tensors["lm_head.weight"] = weight(n_vocab, shape.n_embd)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def write_tiny_llama_pair(folder: Path, shape: TinyHfLlama = TinyHfLlama()) -> tuple[Path, Path]:
    """The tiny HF checkpoint in folder/hf and the same model as folder/tiny-llama.gguf."""
    hf_dir = write_tiny_hf_llama(folder / "hf", shape)
    return hf_dir, export_model_gguf(hf_dir, folder / "tiny-llama.gguf", name="tiny-hf-llama")
