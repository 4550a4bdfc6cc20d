"""GGUF header reading: metadata, per-layer arrays, tensor infos, split files, bad input."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from hybridd.model.header import OmittedArray
from hybridd.probe.gguf_file import GgufFormatError, read_gguf_header, split_paths
from tests.twins import add_metadata, gemma3_twin, write_twin


def _write(path: Path, kv: dict[str, object], tensors: dict[str, np.ndarray], arch: str = "llama") -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    add_metadata(writer, kv)
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_reads_metadata_arrays_and_tensor_infos(tmp_path: Path) -> None:
    tokens = [f"t{i}" for i in range(1000)]
    path = _write(tmp_path / "m.gguf", {
        "llama.block_count": 2,
        "llama.attention.head_count_kv": [8, 4],
        "llama.rope.freq_base": 5e5,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.pre": "llama-bpe",
    }, {"blk.0.attn_k.weight": np.zeros((16, 64), dtype=np.float16),
        "output_norm.weight": np.zeros(64, dtype=np.float32)})
    header = read_gguf_header(path)

    assert header.architecture == "llama"
    assert header.metadata["llama.block_count"] == 2
    assert header.metadata["llama.attention.head_count_kv"] == [8, 4]
    assert header.metadata["llama.rope.freq_base"] == pytest.approx(5e5)
    assert header.metadata["tokenizer.ggml.pre"] == "llama-bpe"
    # long tokenizer arrays are skipped, only their length kept
    assert header.metadata["tokenizer.ggml.tokens"] == OmittedArray("str", 1000)
    by_name = {t.name: t for t in header.tensors}
    assert by_name["blk.0.attn_k.weight"].shape == (64, 16)  # ggml order: ne[0] first
    assert by_name["blk.0.attn_k.weight"].ggml_type.name == "f16"
    assert by_name["blk.0.attn_k.weight"].n_bytes == 64 * 16 * 2
    assert by_name["output_norm.weight"].n_bytes == 64 * 4
    assert header.file_bytes == path.stat().st_size


def test_quantized_tensor_bytes_use_ggml_block_sizes(tmp_path: Path) -> None:
    raw = np.zeros((4, 34 * 2), dtype=np.uint8)  # 4 rows of 64 q8_0 values = 2 blocks of 34 bytes each
    writer = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "llama")
    writer.add_tensor("blk.0.ffn_up.weight", raw, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (tensor,) = read_gguf_header(tmp_path / "q.gguf").tensors
    assert tensor.shape == (64, 4)
    assert tensor.ggml_type.name == "q8_0"
    assert tensor.n_bytes == 4 * 2 * 34  # not 64*4 bytes at "1 byte per q8_0 value"


def test_matches_gguf_reader_on_a_twin(tmp_path: Path) -> None:
    path = write_twin(tmp_path / "g.gguf", gemma3_twin())
    ours = read_gguf_header(path)
    reference = gguf.GGUFReader(str(path))
    assert [t.name for t in ours.tensors] == [t.name for t in reference.tensors]
    assert [t.shape for t in ours.tensors] == [tuple(int(d) for d in t.shape) for t in reference.tensors]
    assert [t.n_bytes for t in ours.tensors] == [int(t.n_bytes) for t in reference.tensors]
    assert ours.metadata["gemma3.attention.sliding_window"] == 1024


def test_split_model_merges_tensor_infos(tmp_path: Path) -> None:
    first = _write(tmp_path / "big-00001-of-00002.gguf", {"llama.block_count": 2, "split.count": 2},
                   {"blk.0.attn_q.weight": np.zeros((8, 8), dtype=np.float32)})
    _write(tmp_path / "big-00002-of-00002.gguf", {"split.count": 2},
           {"blk.1.attn_q.weight": np.zeros((8, 8), dtype=np.float32)})
    assert split_paths(tmp_path / "big-00002-of-00002.gguf")[0] == first
    header = read_gguf_header(tmp_path / "big-00002-of-00002.gguf")
    assert [t.name for t in header.tensors] == ["blk.0.attn_q.weight", "blk.1.attn_q.weight"]
    assert header.metadata["llama.block_count"] == 2
    assert len(header.paths) == 2


def test_missing_shard_is_a_clear_error(tmp_path: Path) -> None:
    _write(tmp_path / "m-00001-of-00003.gguf", {"split.count": 3}, {})
    with pytest.raises(GgufFormatError, match="shard 2 of 3 is missing"):
        read_gguf_header(tmp_path / "m-00001-of-00003.gguf")


def test_not_a_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    with pytest.raises(GgufFormatError, match="bad magic"):
        read_gguf_header(path)


def test_truncated_header(tmp_path: Path) -> None:
    path = write_twin(tmp_path / "t.gguf", gemma3_twin())
    data = path.read_bytes()[:2000]
    path.write_bytes(data)
    with pytest.raises(GgufFormatError, match=r"truncated|past the end"):
        read_gguf_header(path)
