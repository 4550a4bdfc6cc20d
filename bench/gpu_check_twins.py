"""Full-size architecture twins for bench/gpu_check.py: a model profile's real shapes, random quantized weights.

Unlike the test suite's twins (tests/twins.py: real attention geometry, tiny FFN and vocabulary, zero weights as a
hole), these keep every dimension of the model profile (profiles/models/*.toml), so the bytes a GPU holds and reads
per token are the real model's, and fill them with random blocks of a real quant type. Each block's scales are set
to small finite values, so activations stay finite and decoding runs the real kernels at the real width; the text
it writes is noise. The vocabulary is a byte-level SentencePiece one padded to the profile's vocab_size with
distinct filler tokens: requests send token ids, never text.

Layout: hybridd.model.synth.tensor_layout (the one the planner and the twin tests use), so what is written is what
the plan predicts from.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from hybridd.demo.tiny_gguf import add_byte_tokenizer, add_metadata
from hybridd.model.synth import TensorRole, tensor_layout

POOL_BYTES = 64 * 1024 * 1024
FIRST_FILLER = 259  # <unk>, <s>, </s>, then 256 byte tokens
# Per block type: (offset of each f16 scale inside a block, the value written there). Chosen so a weight is about
# 0.02 in size whatever the random quants are: d * quant ~ 0.02.
_SCALES: dict[gguf.GGMLQuantizationType, tuple[tuple[int, float], ...]] = {
    gguf.GGMLQuantizationType.Q8_0: ((0, 3e-4),),
    gguf.GGMLQuantizationType.Q4_0: ((0, 3e-3),),
    gguf.GGMLQuantizationType.Q4_K: ((0, 1e-4), (2, 1e-4)),
    gguf.GGMLQuantizationType.Q5_K: ((0, 5e-5), (2, 5e-5)),
    gguf.GGMLQuantizationType.Q6_K: ((208, 1.5e-5),),
}
# Per quant scheme: the type of most matrices, of the output head, and of tensors kept in f32 by the converters.
SCHEMES = {
    "Q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "Q4_K_M": (gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K, gguf.LlamaFileType.MOSTLY_Q4_K_M),
}
F32_NAMES = ("ffn_gate_inp", ".attn_k_b.", ".attn_v_b.")


@dataclass(frozen=True)
class TwinFile:
    """A written twin: its path, size and how long it took to write."""

    path: Path
    file_bytes: int
    write_s: float
    n_vocab: int


def byte_vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """<unk>, <s>, </s>, 256 byte tokens, then distinct filler tokens up to n_vocab."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"\u2581w{i}" for i in range(max(0, n_vocab - len(tokens)))]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    types += [gguf.TokenType.NORMAL] * (len(tokens) - len(types))
    return tokens[:n_vocab], [0.0] * min(n_vocab, len(tokens)), [int(t) for t in types[:n_vocab]]


def _tensor_type(name: str, role: TensorRole, row: int, scheme: str) -> gguf.GGMLQuantizationType:
    if role is TensorRole.VECTOR or any(part in name for part in F32_NAMES):
        return gguf.GGMLQuantizationType.F32
    main, head, _ = SCHEMES[scheme]
    wanted = head if name.startswith("output.") else main
    block, _ = gguf.GGML_QUANT_SIZES[wanted]
    if row % block == 0:
        return wanted
    return gguf.GGMLQuantizationType.Q8_0 if row % 32 == 0 else gguf.GGMLQuantizationType.F16


def _nbytes(qtype: gguf.GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    n_values = int(np.prod(shape))
    return n_values // block * block_bytes


def _pool(qtype: gguf.GGMLQuantizationType, rng: np.random.Generator, pools: dict[int, bytes]) -> bytes:
    """POOL_BYTES of random data of qtype (whole blocks, scales set), made once and written over and over: random
    generation runs at tens of MB/s on a slow CPU, writing at GB/s, and repeated noise decodes as fast as fresh."""
    if int(qtype) in pools:
        return pools[int(qtype)]
    if qtype == gguf.GGMLQuantizationType.F16:
        pool = (rng.standard_normal(POOL_BYTES // 2, dtype=np.float32) * 0.02).astype(np.float16).tobytes()
    else:
        _, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        blocks = np.frombuffer(bytearray(rng.bytes(POOL_BYTES // block_bytes * block_bytes)), dtype=np.uint8)
        blocks = blocks.reshape(-1, block_bytes)
        for offset, value in _SCALES[qtype]:
            blocks[:, offset:offset + 2] = np.frombuffer(np.float16(value).tobytes(), dtype=np.uint8)
        pool = blocks.tobytes()
    pools[int(qtype)] = pool
    return pool


def _fill(out: Any, name: str, qtype: gguf.GGMLQuantizationType, nbytes: int, rng: np.random.Generator,
          pools: dict[int, bytes]) -> None:
    """Write nbytes of name's data: norms 1.0, other f32 vectors 0, f16 small noise, quant blocks random + scales."""
    if qtype == gguf.GGMLQuantizationType.F32:
        value = 1.0 if "norm" in name else 0.0
        out.write(np.full(nbytes // 4, value, dtype=np.float32).tobytes())
        return
    pool = memoryview(_pool(qtype, rng, pools))
    left = nbytes
    while left > 0:  # the pool holds whole blocks, so every piece ends on a block boundary
        piece = min(len(pool), left)
        out.write(pool[:piece])
        left -= piece


TwinTensor = tuple[str, tuple[int, ...], gguf.GGMLQuantizationType, int]


def twin_tensors(metadata: Mapping[str, Any], scheme: str) -> list[TwinTensor]:
    """Each tensor a twin of metadata in scheme holds: (name, shape as tensor_layout gives it, type, bytes)."""
    tensors = []
    for slot in tensor_layout(metadata):
        qtype = _tensor_type(slot.name, slot.role, slot.shape[0], scheme)
        tensors.append((slot.name, tuple(slot.shape), qtype, _nbytes(qtype, slot.shape)))
    return tensors


def write_twin(path: Path, metadata: Mapping[str, Any], scheme: str, seed: int = 0) -> TwinFile:
    """Write the profile metadata's full layout in scheme's quant types, random weights, to path."""
    started = time.monotonic()
    md = dict(metadata)
    arch = str(md["general.architecture"])
    n_vocab = int(md.get(f"{arch}.vocab_size", 0)) or 32000
    md[f"{arch}.vocab_size"] = n_vocab
    md["general.name"] = f"{md.get('general.name', arch)} (random-weight twin, {scheme})"
    md["general.file_type"] = int(SCHEMES[scheme][2])
    writer = gguf.GGUFWriter(str(path), arch)
    add_metadata(writer, md)
    tokens, scores, types = byte_vocab(n_vocab)
    add_byte_tokenizer(writer, tokens, scores, types)
    planned: list[tuple[str, gguf.GGMLQuantizationType, int]] = []
    for name, layout_shape, qtype, nbytes in twin_tensors(md, scheme):
        shape = tuple(reversed(layout_shape))
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.dtype(np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16)
            writer.add_tensor_info(name, shape, dtype, nbytes)
        else:
            row_bytes = _nbytes(qtype, (layout_shape[0],))
            writer.add_tensor_info(name, (*shape[:-1], row_bytes), np.dtype(np.uint8), nbytes, raw_dtype=qtype)
        planned.append((name, qtype, nbytes))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    assert writer.fout is not None
    out = writer.fout[0]
    rng = np.random.default_rng(seed)
    pools: dict[int, bytes] = {}
    out.write(bytes(gguf.GGUFWriter.ggml_pad(out.tell(), writer.data_alignment) - out.tell()))
    for name, qtype, nbytes in planned:
        _fill(out, name, qtype, nbytes, rng, pools)
        out.write(bytes(gguf.GGUFWriter.ggml_pad(nbytes, writer.data_alignment) - nbytes))
    writer.close()
    return TwinFile(path, path.stat().st_size, time.monotonic() - started, n_vocab)


def shrink(metadata: Mapping[str, Any], layers: int, vocab: int) -> dict[str, Any]:
    """The same architecture with fewer layers and a smaller vocabulary: the dry run's CPU-sized stand-in."""
    md = dict(metadata)
    arch = str(md["general.architecture"])
    md[f"{arch}.block_count"] = min(int(md[f"{arch}.block_count"]), layers)
    md[f"{arch}.vocab_size"] = min(int(md.get(f"{arch}.vocab_size", vocab)), vocab)
    return md
