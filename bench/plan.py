"""Benchmark: plan a real GGUF header from a cold file, and the pure estimate, against baselines in one run.

Cold file: a freshly written GGUF (the layout of a real Qwen3-30B-A3B header: 48 layers, 579 tensors, a
151936-token vocabulary with its merges) whose pages are dropped from the page cache with
posix_fadvise(DONTNEED) before each read. Baseline: gguf.GGUFReader on the same cold file. The estimate is
timed against a baseline that only sums the layer weights. Writes bench/results/plan.json.

Run: .venv/bin/python bench/plan.py
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybridd.model.memory import RunSettings, estimate_memory
from hybridd.model.spec import model_spec
from hybridd.model.synth import tensor_layout
from hybridd.place.devices import Device
from hybridd.place.plan import plan
from hybridd.probe.gguf_file import read_gguf_header

GIB = 1024**3
N_VOCAB = 151936
N_MERGES = 151387


def _metadata() -> dict[str, object]:
    return {
        "general.architecture": "qwen3moe", "qwen3moe.block_count": 48, "qwen3moe.context_length": 262144,
        "qwen3moe.embedding_length": 2048, "qwen3moe.feed_forward_length": 6144,
        "qwen3moe.attention.head_count": 32, "qwen3moe.attention.head_count_kv": 4,
        "qwen3moe.attention.key_length": 128, "qwen3moe.attention.value_length": 128,
        "qwen3moe.expert_count": 128, "qwen3moe.expert_used_count": 8,
        "qwen3moe.expert_feed_forward_length": 768, "qwen3moe.attention.layer_norm_rms_epsilon": 1e-6,
        "qwen3moe.vocab_size": N_VOCAB,
    }


def write_header_file(path: Path) -> None:
    """A GGUF with a real model's header (all tensor infos, full tokenizer) and tiny placeholder data."""
    md = _metadata()
    writer = gguf.GGUFWriter(str(path), "qwen3moe")
    for key, value in md.items():
        if key == "general.architecture":
            continue
        if isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_float32(key, float(value))  # type: ignore[arg-type]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"tok{i:06d}" for i in range(N_VOCAB)])
    writer.add_token_merges([f"t{i} m{i}" for i in range(N_MERGES)])
    writer.add_token_types([1] * N_VOCAB)
    data_bytes = 0
    for slot in tensor_layout(md):
        nbytes = 2 * int(np.prod(slot.shape))
        data_bytes += nbytes + 32  # + alignment padding
        writer.add_tensor_info(slot.name, tuple(reversed(slot.shape)), np.dtype(np.float16), nbytes,
                               raw_dtype=gguf.GGMLQuantizationType.F16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    # the weights are a hole: a sparse file as large as the real one (61 GB of f16), nothing written
    os.truncate(path, path.stat().st_size + data_bytes)


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(fn: Callable[[], object], repeat: int, before: Callable[[], None] | None = None) -> list[float]:
    out = []
    for _ in range(repeat):
        if before:
            before()
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    devices = [Device("RTX 4090", 24 * GIB, 23 * GIB), Device("RTX 5070 Ti", 16 * GIB, 15 * GIB)]
    settings = RunSettings(ctx=65536, type_k="q8_0", type_v="q8_0")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "qwen3-30b-a3b-header.gguf"
        write_header_file(path)
        size = path.stat().st_size

        def ours() -> object:
            header = read_gguf_header(path)
            return plan(model_spec(header.metadata, header.tensors), settings, devices, 64 * GIB)

        def baseline() -> object:
            return gguf.GGUFReader(str(path))

        cold_ours = timed(ours, 5, before=lambda: drop_cache(path))
        cold_base = timed(baseline, 3, before=lambda: drop_cache(path))
        warm_ours = timed(ours, 5)
        header = read_gguf_header(path)
        n_tensors = len(header.tensors)

    spec = model_spec(header.metadata, header.tensors)
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        estimate_memory(spec, settings)
    est_us = (time.perf_counter() - t0) / n * 1e6
    t0 = time.perf_counter()
    for _ in range(n):
        sum(ly.weight_bytes for ly in spec.layers)
    sum_us = (time.perf_counter() - t0) / n * 1e6

    rows = [
        ("plan from cold GGUF header (read + spec + estimate + fit)", statistics.median(cold_ours) * 1e3, "ms", 50.0),
        ("baseline: gguf.GGUFReader on the same cold file", statistics.median(cold_base) * 1e3, "ms", None),
        ("plan from warm GGUF header", statistics.median(warm_ours) * 1e3, "ms", None),
        ("estimate_memory (pure)", est_us, "us", 100.0),
        ("baseline: sum of layer weights (pure)", sum_us, "us", None),
    ]
    print(f"file: {size / 1e9:.1f} GB sparse, {n_tensors} tensors, vocab {N_VOCAB}, merges {N_MERGES}")
    print(f"{'measurement':<60}{'median':>10}  unit  target")
    for label, value, unit, target in rows:
        verdict = "" if target is None else ("ok" if value < target else "MISSED")
        print(f"{label:<60}{value:>10.2f}  {unit:<4}  {'' if target is None else f'< {target:g} {verdict}'}")
    out = Path(__file__).with_name("results") / "plan.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({
        "file_bytes": size, "tensors": n_tensors,
        "results": [{"name": label, "median": value, "unit": unit, "target": target}
                    for label, value, unit, target in rows],
    }, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
