"""Our memory estimate against llama.cpp's own allocations, on architecture twins.

llama.cpp under test: the copy vendored by llama-cpp-python 0.3.36, llama.cpp commit
0c1e57098bba43ac29e6e3b677cdceebdd22334f (2026-10-01, version 0.5.0-dev). Each twin (tests/twins.py) keeps a
family's real attention geometry; llama.cpp loads it on the CPU, creates contexts at several sizes and cache
types, and logs `llama_kv_cache: size = ... MiB`, `llama_memory_recurrent: size = ... MiB`,
`llama_context: CPU output buffer size = ... MiB` and `sched_reserve: CPU compute buffer size = ... MiB`. KV and
recurrent state must agree within 1% (they are exact sums of tensor sizes; the log rounds to 0.01 MiB), the output
buffer within 0.01 MiB (n_vocab x n_seq f32; with the twins' 256-token vocabulary that pins the line, not a size:
the logits' weight is in the compute buffer of real models, see test_memory_totals.py), the compute buffer within 15%
(ggml-alloc's reuse of freed tensors is modelled as a sum of live sets, not replayed node by node). Every family
loads in this version (MLA's attn_k_b/attn_v_b are written as f32: the CPU backend has no f16 kernel for those 3-D
products): llama (GQA), gemma3 (sliding window), deepseek2 (MLA), qwen3next and qwen35moe (hybrid Gated DeltaNet;
the qwen35moe twin also carries its MTP block), gpt-oss (SWA), qwen3moe, qwen3 and qwen2 (GQA; qwen2 keeps its
real n_embd, see tests/twins.py).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hybridd.model.memory import RunSettings, estimate_memory
from hybridd.model.spec import model_spec
from hybridd.probe.gguf_file import read_gguf_header
from tests.twins import TWINS, write_twin

MIB = 1024 * 1024
PROBE = Path(__file__).with_name("llama_probe.py")

CONFIGS: list[dict[str, Any]] = [
    {"ctx": 4096},
    {"ctx": 4096, "flash_attn": True},
    {"ctx": 16384, "flash_attn": True, "type_k": "q8_0", "type_v": "q8_0"},
    {"ctx": 10000, "type_k": "q8_0"},  # not a multiple of 256: checks the padding
    {"ctx": 8192, "n_seq": 2},
    {"ctx": 8192, "n_seq": 2, "kv_unified": True, "flash_attn": True},
    {"ctx": 4096, "flash_attn": True, "swa_full": True},
    {"ctx": 2048, "n_ubatch": 256, "n_batch": 256},
    {"ctx": 32768, "flash_attn": True, "type_k": "q4_0", "type_v": "q4_0"},
]

# Configurations a twin skips to keep this file's run short: Qwen3-32B's 64 layers x 8 KV heads make the largest
# caches here (2.2-2.3 GB at configs 2 and 8, about 8 s of the run); its quantized-cache (3) and flash-attention
# (1, 5, 6) runs stay.
SKIP_CONFIGS: dict[str, frozenset[int]] = {"qwen3-gqa": frozenset({2, 8})}
# Configurations only one twin runs: Qwen3.5's Gated-DeltaNet block peaks on the per-sequence states from about four
# parallel sequences on (memory.py _recurrent_peak).
EXTRA_CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("qwen35moe-hybrid", {"ctx": 16384, "n_seq": 4, "kv_unified": True, "flash_attn": True}),
    ("qwen35moe-hybrid", {"ctx": 16384, "n_seq": 8, "flash_attn": True, "type_k": "q8_0", "type_v": "q8_0"}),
]
ALL_CONFIGS = CONFIGS + [cfg for _, cfg in EXTRA_CONFIGS]
CASES = ([(name, index) for index in range(len(CONFIGS)) for name in TWINS
          if index not in SKIP_CONFIGS.get(name, frozenset())]
         + [(name, len(CONFIGS) + k) for k, (name, _) in enumerate(EXTRA_CONFIGS)])

_SIZE = {
    "kv": re.compile(r"llama_kv_cache: size = +([\d.]+) MiB"),
    "recurrent": re.compile(r"llama_memory_recurrent: size = +([\d.]+) MiB"),
    "compute": re.compile(r"sched_reserve: +\S+ compute buffer size = +([\d.]+) MiB"),
    "output": re.compile(r"llama_context: +\S+ +output buffer size = +([\d.]+) MiB"),
}


def _mla_refuses(name: str, cfg: dict[str, Any]) -> bool:
    # MLA's V is a view of K, so a quantized K without flash attention is refused (see test below)
    return name.startswith("deepseek2") and not cfg.get("flash_attn") and cfg.get("type_k", "f16") != "f16"


@pytest.fixture(scope="module")
def llama_allocations(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """For each twin: its path and llama.cpp's logged sizes per config (one subprocess per twin)."""
    folder = tmp_path_factory.mktemp("twins")
    out: dict[str, dict[str, Any]] = {}
    for name, metadata in TWINS.items():
        path = write_twin(folder / f"{name}.gguf", metadata())
        indices = [index for twin, index in CASES if twin == name]
        configs = [ALL_CONFIGS[index] for index in indices]
        proc = subprocess.run([sys.executable, str(PROBE), str(path), json.dumps(configs)],
                              capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, f"{name}: llama.cpp crashed: {proc.stderr[-2000:]}"
        report = json.loads(proc.stdout)
        assert "results" in report, f"{name}: {report}"
        sizes: dict[int, dict[str, Any]] = {}
        logs: dict[int, str] = {}
        for index, result in zip(indices, report["results"], strict=True):
            sizes[index] = {key: sum(float(m) for m in rx.findall(result["log"])) * MIB
                            for key, rx in _SIZE.items()} | {"ok": result["ok"]}
            logs[index] = result["log"]
        out[name] = {"path": path, "sizes": sizes, "logs": logs}
    return out


def _settings(cfg: dict[str, Any]) -> RunSettings:
    return RunSettings(ctx=cfg["ctx"], n_seq=cfg.get("n_seq", 1), kv_unified=cfg.get("kv_unified", False),
                       type_k=cfg.get("type_k", "f16"), type_v=cfg.get("type_v", "f16"),
                       flash_attn=cfg.get("flash_attn", False), n_batch=cfg.get("n_batch", 2048),
                       n_ubatch=cfg.get("n_ubatch", 512), swa_full=cfg.get("swa_full", False), backend="cpu")


@pytest.mark.parametrize(("name", "index"), CASES)
def test_estimate_matches_llama_cpp(llama_allocations: dict[str, dict[str, Any]], name: str, index: int) -> None:
    cfg = ALL_CONFIGS[index]
    measured = llama_allocations[name]["sizes"][index]
    if _mla_refuses(name, cfg):
        assert not measured["ok"]
        return
    assert measured["ok"], f"{name} {cfg}: llama.cpp refused the context"
    header = read_gguf_header(llama_allocations[name]["path"])
    estimate = estimate_memory(model_spec(header.metadata, header.tensors), _settings(cfg))

    assert estimate.kv_bytes == pytest.approx(measured["kv"], rel=0.01)
    assert estimate.recurrent_bytes == pytest.approx(measured["recurrent"], rel=0.01, abs=0.01 * MIB)
    assert estimate.compute_bytes == pytest.approx(measured["compute"], rel=0.15)
    assert estimate.output_buffer_bytes == pytest.approx(measured["output"], abs=0.01 * MIB)


@pytest.mark.parametrize("name", ["qwen3next-hybrid", "qwen35moe-hybrid"])
def test_hybrid_twin_charges_kv_only_to_attention_layers(llama_allocations: dict[str, dict[str, Any]],
                                                         name: str) -> None:
    header = read_gguf_header(llama_allocations[name]["path"])
    spec = model_spec(header.metadata, header.tensors)
    estimate = estimate_memory(spec, _settings({"ctx": 4096}))
    # 48 layers, full attention every 4th: 12 KV layers, 36 recurrent ones (the 4x error of charging all 48);
    # qwen35moe's 49th block (MTP) holds nothing in the main context
    assert len(estimate.layers) == 48
    assert sum(1 for ly in estimate.layers if ly.kv_bytes) == 12
    assert sum(1 for ly in estimate.layers if ly.recurrent_bytes) == 36
    assert estimate.kv_bytes == pytest.approx(llama_allocations[name]["sizes"][0]["kv"], rel=0.01)
    log = llama_allocations[name]["logs"][0]
    assert re.search(r"llama_kv_cache: size = .*\b12 layers", log)


def test_mla_quantized_cache_without_flash_attention_is_noted(llama_allocations: dict[str, dict[str, Any]]) -> None:
    header = read_gguf_header(llama_allocations["deepseek2-mla"]["path"])
    estimate = estimate_memory(model_spec(header.metadata, header.tensors), _settings(CONFIGS[3]))
    assert not llama_allocations["deepseek2-mla"]["sizes"][3]["ok"]
    assert any("flash attention" in note for note in estimate.notes)


def test_qwen2_head_size_defaults_to_n_embd_over_heads(llama_allocations: dict[str, dict[str, Any]]) -> None:
    # the qwen2 twin, like converted Qwen2.5 files, has no key_length: 3584 / 28 = 128, as llama.cpp derives it
    header = read_gguf_header(llama_allocations["qwen2-gqa"]["path"])
    assert "qwen2.attention.key_length" not in header.metadata
    spec = model_spec(header.metadata, header.tensors)
    assert spec.layers[0].key_length == spec.layers[0].value_length == 128
    assert spec.layers[0].k_values_per_token == 4 * 128
