"""Catalog: configured models, library scan (split files, projectors), aliases, unknown ids."""

from __future__ import annotations

from pathlib import Path

import pytest

from hybridd.config import parse_config
from hybridd.errors import ModelNotFound
from hybridd.node.catalog import build_catalog, model_id_for, scan_library, split_part


def test_split_files_are_one_model(tmp_path: Path) -> None:
    for name in ("Qwen3-Coder-Next-Q4_K_M-00001-of-00002.gguf", "Qwen3-Coder-Next-Q4_K_M-00002-of-00002.gguf",
                 "gemma-3-27b.gguf", "mmproj-gemma.gguf", "notes.txt"):
        (tmp_path / name).write_bytes(b"GGUF")
    found = scan_library([tmp_path, tmp_path / "missing"])
    assert [p.name for p in found] == ["Qwen3-Coder-Next-Q4_K_M-00001-of-00002.gguf", "gemma-3-27b.gguf"]
    assert [model_id_for(p) for p in found] == ["qwen3-coder-next-q4_k_m", "gemma-3-27b"]
    assert split_part(Path("x-00011-of-00012.gguf")) == 11 and split_part(Path("x-of-y.gguf")) is None


def test_configured_models_win_over_scanned(tmp_path: Path) -> None:
    (tmp_path / "coder.gguf").write_bytes(b"GGUF")
    (tmp_path / "other.gguf").write_bytes(b"GGUF")
    config = parse_config(f'[engine]\nctx = 2048\n[[models]]\nname = "coder"\npath = "{tmp_path}/x.gguf"\n'
                          f'aliases = ["c"]\n[library]\ndirs = ["{tmp_path}"]')
    catalog = build_catalog(config, scan_library(config.library_dirs))
    assert [m.name for m in catalog.models] == ["coder", "other"]
    assert catalog.resolve("c").path == tmp_path / "x.gguf"
    assert catalog.resolve("other").ctx == 2048
    with pytest.raises(ModelNotFound, match="available: coder, other") as info:
        catalog.resolve("gpt-4")
    assert info.value.status == 404
