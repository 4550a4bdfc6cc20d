"""Subprocess helper: load a GGUF in llama.cpp on the CPU, create contexts, print the allocation log as JSON.

Run as `python tests/llama_probe.py MODEL CONFIGS_JSON`; a separate process keeps llama.cpp's log callback and
any GGML_ASSERT abort away from the test process.
"""

from __future__ import annotations

import ctypes
import json
import sys

import llama_cpp

_lines: list[str] = []


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _collect(level: int, text: bytes, user: object) -> None:
    _lines.append(text.decode("utf-8", "replace"))


GGML_TYPE_IDS = {"f16": 1, "q8_0": 8, "q4_0": 2, "f32": 0, "q4_1": 3, "q5_0": 6, "q5_1": 7, "iq4_nl": 20, "bf16": 30}


def main() -> None:
    llama_cpp.llama_log_set(_collect, None)
    path, configs = sys.argv[1], json.loads(sys.argv[2])
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(path.encode(), mparams)
    if not model:
        print(json.dumps({"error": "load failed", "log": "".join(_lines)}))
        return
    results = []
    for cfg in configs:
        _lines.clear()
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = cfg["ctx"]
        cparams.n_batch = cfg.get("n_batch", 2048)
        cparams.n_ubatch = cfg.get("n_ubatch", 512)
        cparams.n_seq_max = cfg.get("n_seq", 1)
        cparams.kv_unified = cfg.get("kv_unified", False)
        cparams.type_k = GGML_TYPE_IDS[cfg.get("type_k", "f16")]
        cparams.type_v = GGML_TYPE_IDS[cfg.get("type_v", "f16")]
        cparams.flash_attn_type = 1 if cfg.get("flash_attn") else 0
        cparams.swa_full = cfg.get("swa_full", False)
        cparams.n_threads = cparams.n_threads_batch = 2
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if ctx:
            llama_cpp.llama_free(ctx)
        results.append({"cfg": cfg, "ok": bool(ctx), "log": "".join(_lines)})
    llama_cpp.llama_model_free(model)
    print(json.dumps({"results": results}))


if __name__ == "__main__":
    main()
