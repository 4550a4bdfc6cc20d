"""Quantize a GGUF to another llama.cpp file type, in process, with the llama.cpp llama-cpp-python carries (blocking:
call it off the event loop). A full fine-tune comes back at 16 bits; it is served as its base was quantized."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

# llama.cpp's llama_ftype values that are not quantized: nothing to do for a base stored like that.
UNQUANTIZED = {0, 1, 32}  # ALL_F32, MOSTLY_F16, MOSTLY_BF16


def quantize(source: Path, out: Path, file_type: int, threads: int | None = None) -> Path:
    """Write `source` quantized to llama.cpp's `file_type` (general.file_type of a GGUF) at `out`."""
    import llama_cpp  # deferred: the shared library loads only when a model is quantized

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = file_type
    params.nthread = threads or os.cpu_count() or 1
    partial = out.with_name(f".{out.name}.partial")
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params))
    if status != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp could not quantize {source.name} to file type {file_type} (status {status})")
    os.replace(partial, out)
    return out
