"""`python -m hybridd.engine.llamacpp_main [--repack on|off] ARGS`: llama_cpp.server plus what its CLI lacks.

llama.cpp's model parameter `use_extra_bufts` (llama-server's `--no-repack`) is in llama-cpp-python's ctypes
struct but not wired to `Llama()`. We need it off on CPUs with AMX: there ggml's AMX matmul segfaults on
K-quant weights (seen with llama-cpp-python 0.3.36 on Gemma 3 Q4_K_M), and the engine dies on its first token.
"""

from __future__ import annotations

import sys


def _disable_extra_buffers() -> None:
    import llama_cpp.llama_cpp as native

    defaults = native.llama_model_default_params

    def params() -> native.llama_model_params:
        p = defaults()
        p.use_extra_bufts = False
        return p

    native.llama_model_default_params = params


def main(argv: list[str]) -> None:
    """Apply --repack, then hand the remaining arguments to llama_cpp.server."""
    if "--repack" in argv:
        at = argv.index("--repack")
        if argv[at + 1] == "off":
            _disable_extra_buffers()
        del argv[at:at + 2]
    from llama_cpp.server.__main__ import main as server_main

    sys.argv = ["llama_cpp.server", *argv]
    server_main()


if __name__ == "__main__":
    main(sys.argv[1:])
