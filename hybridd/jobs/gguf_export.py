"""Hugging Face checkpoints and PEFT LoRA adapters written as GGUF files that llama.cpp loads.

Only numpy, gguf and the standard library: safetensors files are read here (bf16 included), so exporting needs
no torch. The llama architecture is supported; anything else is refused with a ValueError naming it.

llama.cpp's rotary embedding pairs a head's dimensions differently from Hugging Face's, so the rows of q_proj and
k_proj are permuted on the way in, as llama.cpp's convert_hf_to_gguf.py does. A LoRA delta B·A lands on those rows
through B, so LoRA-B of q/k gets the same row permutation; LoRA-A is left alone.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ARCHITECTURES = {"llama": "LlamaForCausalLM"}  # model_type -> the HF class we know how to export
# The PEFT target modules llama.cpp can apply, and their GGUF tensor names (blk.N.<name>.weight).
LLAMA_LORA_TARGETS = {
    "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
    "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
}
_CHECKPOINT_FILES = ("config.json",)
_WEIGHT_GLOBS = ("*.safetensors",)
_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
                       "I64": np.int64, "I32": np.int32, "U8": np.uint8}


def checkpoint_sha256(model_dir: Path | str) -> str:
    """sha256 over a checkpoint's config.json and its *.safetensors files, by sorted name: name, NUL, bytes each."""
    folder = Path(model_dir)
    files = [folder / name for name in _CHECKPOINT_FILES]
    files += sorted(p for pattern in _WEIGHT_GLOBS for p in folder.glob(pattern))
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of one file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# ---- safetensors, read without torch ----

def read_safetensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 or integer array) for each tensor of one safetensors file; bf16 is widened to float32."""
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path.name}: tensor {name}: dtype {info['dtype']} is not supported")
        start, end = info["data_offsets"]
        array = np.frombuffer(data[start:end], dtype=dtype).reshape(info["shape"])
        if info["dtype"] == "BF16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        yield name, array


def _checkpoint_tensors(model_dir: Path) -> Iterator[tuple[str, np.ndarray, str]]:
    """(name, array, source dtype) over every safetensors file of a checkpoint."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir}: no *.safetensors weights (pytorch .bin checkpoints are not supported)")
    for path in files:
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        for name, array in read_safetensors(path):
            yield name, array, header[name]["dtype"]


# ---- llama specifics ----

def check_architecture(config: dict[str, Any]) -> str:
    """The model_type of a supported HF config; ValueError naming the architecture otherwise."""
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if model_type not in ARCHITECTURES:
        raise ValueError(f"architecture {model_type!r} ({', '.join(archs) or 'no architectures listed'}) "
                         f"cannot be exported to GGUF here (supported: {', '.join(ARCHITECTURES)})")
    kind = _rope_scaling(config)[0]
    if kind not in ("default", "linear", "llama3"):
        raise ValueError(f"rope_scaling type {kind!r} is not supported by this exporter (supported: linear, llama3)")
    return str(model_type)


def _rope_scaling(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The rope scaling kind ("default" for none) and its parameters; transformers 5 calls them rope_parameters."""
    scaling = config.get("rope_scaling") or config.get("rope_parameters")
    if not isinstance(scaling, dict):
        return "default", {}
    return str(scaling.get("rope_type", scaling.get("type", "default"))), scaling


def _rope_theta(config: dict[str, Any]) -> float:
    theta = config.get("rope_theta") or _rope_scaling(config)[1].get("rope_theta") or 10000.0
    return float(theta)


def llama3_rope_factors(config: dict[str, Any]) -> np.ndarray:
    """Per-frequency divisors for Llama 3.x's rope scaling: the rope_freqs tensor convert_hf_to_gguf.py writes."""
    _, scaling = _rope_scaling(config)
    _, _, head_dim = _heads(config)
    freqs = 1.0 / (_rope_theta(config) ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor = float(scaling.get("factor", 8.0))
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_context = float(scaling.get("original_max_position_embeddings", 8192))
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / float(freq)
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1.0 / ((1.0 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _heads(config: dict[str, Any]) -> tuple[int, int, int]:
    n_head = int(config["num_attention_heads"])
    n_head_kv = int(config.get("num_key_value_heads") or n_head)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // n_head)
    return n_head, n_head_kv, head_dim


def permute_rows(weights: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotary layout to llama.cpp's: within each head, interleave the two halves (convert_hf_to_gguf's permute)."""
    rows = weights.shape[0]
    return (weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def _qk_heads(hf_name: str, config: dict[str, Any]) -> int | None:
    """How many heads to permute a q_proj/k_proj tensor by; None for every other tensor."""
    n_head, n_head_kv, _ = _heads(config)
    if ".self_attn.q_proj." in hf_name:
        return n_head
    if ".self_attn.k_proj." in hf_name:
        return n_head_kv
    return None


def _tensor_name_map(config: dict[str, Any]) -> Any:
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(config["num_hidden_layers"]))


def _gguf_name(tmap: Any, hf_name: str) -> str:
    name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ValueError(f"tensor {hf_name!r} has no llama.cpp name")
    return str(name)


# ---- LoRA adapters ----

def check_adapter_supported(adapter_config: dict[str, Any]) -> None:
    """ValueError for a PEFT adapter config that llama.cpp cannot apply; None when it can."""
    if adapter_config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"peft_type {adapter_config.get('peft_type')!r}: only LORA adapters run in llama.cpp")
    if adapter_config.get("use_dora"):
        raise ValueError("use_dora: DoRA adapters cannot be applied by llama.cpp (train plain LoRA)")
    if adapter_config.get("modules_to_save"):
        raise ValueError(f"modules_to_save {adapter_config['modules_to_save']!r}: fully trained modules cannot "
                         "be carried in a llama.cpp LoRA adapter")
    if adapter_config.get("bias", "none") != "none":
        raise ValueError(f"bias {adapter_config['bias']!r}: llama.cpp LoRA adapters carry no biases")
    targets = adapter_config.get("target_modules")
    if targets == "all-linear":
        return
    if not targets or isinstance(targets, str):
        raise ValueError(f"target_modules {targets!r}: give a list of module names "
                         f"(valid: {', '.join(LLAMA_LORA_TARGETS)})")
    unknown = [t for t in targets if t not in LLAMA_LORA_TARGETS]
    if unknown:
        raise ValueError(f"target_modules {unknown!r} have no llama.cpp tensor name "
                         f"(valid: {', '.join(LLAMA_LORA_TARGETS)})")


def lora_alpha_for_llama_cpp(adapter_config: dict[str, Any]) -> float:
    """The alpha llama.cpp needs so that its scale alpha/rank equals PEFT's (rsLoRA: alpha/sqrt(rank))."""
    alpha = float(adapter_config.get("lora_alpha", 8))
    rank = int(adapter_config.get("r", 8))
    if adapter_config.get("rank_pattern") or adapter_config.get("alpha_pattern"):
        raise ValueError("rank_pattern/alpha_pattern: per-module ranks or alphas are not supported in one GGUF")
    return alpha * math.sqrt(rank) if adapter_config.get("use_rslora") else alpha


def export_lora_gguf(peft_adapter_dir: Path | str, base_config: dict[str, Any] | Path | str, out_path: Path | str,
                     *, name: str = "lora") -> Path:
    """Write the PEFT LoRA adapter in peft_adapter_dir as a llama.cpp LoRA GGUF at out_path; return out_path.

    base_config is the base checkpoint's config.json (a dict or its path, or the checkpoint directory)."""
    import gguf

    adapter_dir = Path(peft_adapter_dir)
    config = _load_config(base_config)
    check_architecture(config)
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    check_adapter_supported(adapter_config)
    alpha = lora_alpha_for_llama_cpp(adapter_config)
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise ValueError(f"{adapter_dir}: no adapter_model.safetensors")
    tmap = _tensor_name_map(config)

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    count = 0
    for key, array in read_safetensors(weights):
        hf_name, part = _split_lora_key(key)
        module = hf_name.rsplit(".", 1)[-1]
        if module not in LLAMA_LORA_TARGETS:
            raise ValueError(f"adapter tensor {key!r}: module {module!r} has no llama.cpp tensor name")
        base_name = _gguf_name(tmap, hf_name + ".weight")
        data = np.ascontiguousarray(array, dtype=np.float32)
        heads = _qk_heads(hf_name + ".", config)
        if part == "lora_b" and heads is not None:
            data = np.ascontiguousarray(permute_rows(data, heads))
        # numpy (rows, cols) is ggml's ne reversed: A is (rank, n_in), B is (n_out, rank), as llama.cpp expects.
        writer.add_tensor(f"{base_name}.{part}", data)
        count += 1
    if not count:
        raise ValueError(f"{weights}: no LoRA tensors")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out)
    return out


def _split_lora_key(key: str) -> tuple[str, str]:
    """'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'
    -> ('model.layers.0.self_attn.q_proj', 'lora_a')."""
    for marker, part in ((".lora_A.", "lora_a"), (".lora_B.", "lora_b")):
        if marker in key:
            module = key.split(marker)[0]
            return module.removeprefix("base_model.model."), part
    raise ValueError(f"adapter tensor {key!r} is not a LoRA A/B weight (embedding or DoRA tensors are not supported)")


def _load_config(base_config: dict[str, Any] | Path | str) -> dict[str, Any]:
    if isinstance(base_config, dict):
        return base_config
    path = Path(base_config)
    if path.is_dir():
        path = path / "config.json"
    config: dict[str, Any] = json.loads(path.read_text())
    return config


# ---- full models ----

def export_model_gguf(hf_model_dir: Path | str, out_path: Path | str, *, out_type: str = "auto",
                      name: str | None = None) -> Path:
    """Write the HF llama checkpoint in hf_model_dir (safetensors, tokenizer.json) as a GGUF at out_path.

    out_type: "auto" keeps f32 weights f32 and writes f16/bf16 ones as they are; "f32", "f16" or "bf16" forces one
    type for every matrix (norms stay f32)."""
    import gguf

    model_dir = Path(hf_model_dir)
    config = _load_config(model_dir)
    check_architecture(config)
    if out_type not in ("auto", "f32", "f16", "bf16"):
        raise ValueError(f"out_type {out_type!r} (valid: auto, f32, f16, bf16)")
    n_head, n_head_kv, head_dim = _heads(config)
    n_embd = int(config["hidden_size"])
    tmap = _tensor_name_map(config)

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or model_dir.name)
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_context_length(int(config.get("max_position_embeddings", 4096)))
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    if head_dim != n_embd // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    rope_kind, scaling = _rope_scaling(config)
    if rope_kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif rope_kind == "llama3":
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(config))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    n_vocab = _add_tokenizer(writer, model_dir, int(config["vocab_size"]))
    writer.add_vocab_size(n_vocab)

    file_type = None
    for hf_name, array, source in _checkpoint_tensors(model_dir):
        if hf_name.endswith(".rotary_emb.inv_freq"):
            continue
        gguf_name = _gguf_name(tmap, hf_name)
        data = array.astype(np.float32)
        heads = _qk_heads(hf_name, config)
        if heads is not None:
            data = permute_rows(data, heads)
        kind = out_type if out_type != "auto" else {"F16": "f16", "BF16": "bf16"}.get(source, "f32")
        if data.ndim == 1:
            kind = "f32"
        elif file_type is None:
            file_type = kind
        if kind == "f16":
            writer.add_tensor(gguf_name, np.ascontiguousarray(data.astype(np.float16)))
        elif kind == "bf16":
            packed = gguf.quants.quantize(np.ascontiguousarray(data), gguf.GGMLQuantizationType.BF16)
            writer.add_tensor(gguf_name, packed, raw_shape=packed.shape, raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            writer.add_tensor(gguf_name, np.ascontiguousarray(data))
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16}
                         .get(file_type or "f32", gguf.LlamaFileType.ALL_F32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out)
    return out


def _pre_tokenizer(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's name for the pre-tokenizer in tokenizer.json: gpt-2 (ByteLevel alone) or llama-bpe (Llama 3)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Split", "ByteLevel"] and "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in json.dumps(steps[0]):
        return "llama-bpe"
    raise ValueError(f"pre-tokenizer {kinds!r} is not one this exporter recognises (supported: gpt-2, llama-bpe)")


def _add_tokenizer(writer: Any, model_dir: Path, n_vocab_model: int) -> int:
    """Write tokenizer.json's vocabulary (byte-level BPE, or SentencePiece-style BPE with byte fallback), special
    token ids and the chat template; return the vocabulary size (padded up to the model's)."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{model_dir}: no tokenizer.json (a fast tokenizer is needed; tokenizer.model alone is not "
                         "exported)")
    tokenizer_json = json.loads(path.read_text(encoding="utf-8"))
    model = tokenizer_json["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"tokenizer model {model.get('type')!r}: only BPE tokenizers are exported")
    if model.get("byte_fallback"):
        return _add_spm_tokenizer(writer, model_dir, tokenizer_json, n_vocab_model)
    return _add_gpt2_tokenizer(writer, model_dir, tokenizer_json, n_vocab_model)


def _vocab_table(tokenizer_json: dict[str, Any], n_vocab_model: int, kind_of: Any) -> tuple[list[str], list[int]]:
    """Tokens and their types by id: model vocab, then added tokens, padded with [PADn] up to the model's size."""
    import gguf

    by_id: dict[int, tuple[str, int]] = {i: (t, int(kind_of(t))) for t, i in tokenizer_json["model"]["vocab"].items()}
    for added in tokenizer_json.get("added_tokens") or []:
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        by_id[int(added["id"])] = (added["content"], int(kind))
    size = max(n_vocab_model, max(by_id) + 1)
    table = [by_id.get(i, (f"[PAD{i}]", int(gguf.TokenType.UNUSED))) for i in range(size)]
    return [t for t, _ in table], [k for _, k in table]


def _add_gpt2_tokenizer(writer: Any, model_dir: Path, tokenizer_json: dict[str, Any], n_vocab_model: int) -> int:
    import gguf

    tokens, types = _vocab_table(tokenizer_json, n_vocab_model, lambda _: gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(tokenizer_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    if not special.merges:
        raise ValueError(f"{model_dir / 'tokenizer.json'}: a BPE tokenizer with no merges does not load in llama.cpp")
    special.add_to_gguf(writer)
    return len(tokens)


def _add_spm_tokenizer(writer: Any, model_dir: Path, tokenizer_json: dict[str, Any], n_vocab_model: int) -> int:
    """Llama 2-style: llama.cpp's SentencePiece tokenizer merges by score, so a merged token scores -(merge rank)."""
    import gguf

    model = tokenizer_json["model"]
    unk = model.get("unk_token")

    def kind_of(token: str) -> gguf.TokenType:
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            return gguf.TokenType.BYTE
        return gguf.TokenType.UNKNOWN if token == unk else gguf.TokenType.NORMAL

    tokens, types = _vocab_table(tokenizer_json, n_vocab_model, kind_of)
    rank: dict[str, int] = {}
    for i, merge in enumerate(model.get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, i)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([-float(rank[t]) if t in rank else 0.0 for t in tokens])
    writer.add_token_types(types)
    writer.add_add_space_prefix(_prepends_space(tokenizer_json))
    gguf.SpecialVocab(model_dir, load_merges=False, n_vocab=len(tokens)).add_to_gguf(writer)
    return len(tokens)


def _prepends_space(tokenizer_json: dict[str, Any]) -> bool:
    """Whether the tokenizer puts ▁ before the text (a Prepend normalizer, or a Metaspace that prepends)."""
    def steps(node: Any) -> list[dict[str, Any]]:
        if not isinstance(node, dict):
            return []
        inner = node.get("normalizers") or node.get("pretokenizers")
        return [s for n in inner for s in steps(n)] if node.get("type") == "Sequence" and inner else [node]

    for step in steps(tokenizer_json.get("normalizer")) + steps(tokenizer_json.get("pre_tokenizer")):
        if step.get("type") == "Prepend" and step.get("prepend") == "\u2581":
            return True
        if step.get("type") == "Metaspace" and (step.get("prepend_scheme") in ("first", "always")
                                                or step.get("add_prefix_space")):
            return True
    return False
