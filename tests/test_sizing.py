"""Request sizing: the model's own tokenizer and chat template where the GGUF is here, a safe guess elsewhere."""

from __future__ import annotations

from pathlib import Path

import llama_cpp

from hybridd.demo.tiny_gguf import CHAT_TEMPLATE
from hybridd.node.sizing import Tokenizers, guess_tokens, request_text

CHAT = {"messages": [{"role": "system", "content": "You are terse."},
                     {"role": "user", "content": "def add(a, b):\n    return a + b\n" * 20}]}


def test_chat_tokens_match_the_engines_templated_prompt(tiny_model: Path) -> None:
    size = Tokenizers().count(tiny_model, "chat", CHAT)
    engine = llama_cpp.Llama(str(tiny_model), vocab_only=True, verbose=False)
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    prompt = Jinja2ChatFormatter(template=CHAT_TEMPLATE, eos_token="</s>", bos_token="<s>")(
        messages=CHAT["messages"]).prompt
    assert size.exact
    assert size.tokens == len(engine.tokenize(prompt.encode(), add_bos=False, special=True))


def test_completion_and_token_id_prompts(tiny_model: Path) -> None:
    tokenizers = Tokenizers()
    text = tokenizers.count(tiny_model, "completion", {"prompt": "hello world"})
    ids = tokenizers.count(tiny_model, "completion", {"prompt": [[1, 2, 3, 4]]})
    assert text.tokens >= len("hello world") and ids.tokens == 4 + 1


def test_guess_over_counts_a_real_vocabulary(gemma_model: Path) -> None:
    real = Tokenizers().count(gemma_model, "chat", CHAT)
    guess = guess_tokens("chat", CHAT)
    assert not guess.exact
    assert real.tokens <= guess.tokens <= 2 * real.tokens  # safe side, but not absurdly so
    assert request_text("chat", {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}) == \
        ["hi"]
