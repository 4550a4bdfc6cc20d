"""Request sizing: the model's own tokenizer and chat template where the GGUF is here, a safe guess elsewhere."""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from pathlib import Path

import llama_cpp
import pytest

from hybridd.config import Config, ModelEntry
from hybridd.demo.tiny_gguf import CHAT_TEMPLATE
from hybridd.engine.pool import EnginePool
from hybridd.errors import BadRequest
from hybridd.node.catalog import Catalog
from hybridd.node.request import InferenceRequest
from hybridd.node.router import Router
from hybridd.node.sizing import PIECE_BYTES, Tokenizers, guess_tokens, request_text

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


def code(n_bytes: int) -> str:
    """n_bytes of Python-like text: llama.cpp's SPM tokenizer takes time quadratic in one call's length of it."""
    lines = "def add(a, b):\n    return a + b\n# the quick brown fox jumps over the lazy dog\n"
    return (lines * (n_bytes // len(lines) + 1))[:n_bytes]


def test_a_prompt_past_the_trained_context_is_refused_by_its_length_alone(tiny_model: Path) -> None:
    tokenizers = Tokenizers()
    tokenizers.count(tiny_model, "completion", {"prompt": "warm up"})
    started = time.monotonic()
    size = tokenizers.count(tiny_model, "completion", {"prompt": "x" * (15 << 20)}, limit=4096)
    # A count of all 15 MiB takes this vocabulary about 20 s; its longest piece (5 bytes: '<unk>') gives a floor.
    assert time.monotonic() - started < 3
    assert not size.exact and 4096 < size.tokens <= (15 << 20) // 5 + 1


def test_counting_stops_once_past_the_limit(gemma_model: Path) -> None:
    tokenizers = Tokenizers()
    size = tokenizers.count(gemma_model, "completion", {"prompt": code(1 << 20)}, limit=1000)
    assert not size.exact and 1000 < size.tokens < 1000 + PIECE_BYTES // 2  # stopped within the first piece or two


def test_a_long_text_is_counted_in_pieces_within_a_token_a_cut(gemma_model: Path) -> None:
    text = code(3 * PIECE_BYTES + 1000)
    size = Tokenizers().count(gemma_model, "completion", {"prompt": text})
    vocab = llama_cpp.Llama(str(gemma_model), vocab_only=True, verbose=False)
    whole = len(vocab.tokenize(text.encode(), add_bos=False, special=False)) + 1
    assert not size.exact and whole <= size.tokens <= whole + 3


def test_counting_keeps_no_list_of_tokens(tiny_model: Path) -> None:
    tokenizers = Tokenizers()
    tokenizers.count(tiny_model, "completion", {"prompt": "warm up"})
    body = {"prompt": "y" * (256 << 10)}
    tracemalloc.start()
    try:
        size = tokenizers.count(tiny_model, "completion", body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert size.tokens > 256 << 10
    assert peak < 2.5 * (256 << 10)  # the text's UTF-8 copy; a list of its 262144 token ids alone is 2 MiB


async def test_small_requests_are_sized_while_large_ones_wait_their_turn(gemma_model: Path) -> None:
    tokenizers = Tokenizers()
    await tokenizers.load(gemma_model)
    large = {"prompt": code(6 * PIECE_BYTES)}  # about a third of a second each
    done: list[str] = []

    async def size(name: str, body: dict) -> None:  # type: ignore[type-arg]
        await tokenizers.size(gemma_model, "completion", body)
        done.append(name)

    tasks = [asyncio.create_task(size(f"large{i}", large)) for i in range(8)]
    await asyncio.sleep(0)  # all eight are queued for the thread that counts large requests
    await size("small", {"prompt": "How are you?"})
    assert done == ["small"]  # asyncio's own threads were free for it: not one large count had ended
    await asyncio.gather(*tasks)
    assert len(done) == 9


async def test_a_request_that_cannot_be_counted_fails_alone(tiny_model: Path) -> None:
    model = ModelEntry(name="tiny", path=tiny_model)
    router = Router(Config(models=(model,)), Catalog((model,)), EnginePool(lambda entry: None), None)  # type: ignore[arg-type, return-value]
    bad = InferenceRequest("completion", "tiny", False, {"model": "tiny", "prompt": "abc\ud800"})
    with pytest.raises(BadRequest, match=r"lone surrogate \(U\+D800\) at character 3"):
        await router.size(bad, model)
    size = await router.size(InferenceRequest("completion", "tiny", False, {"model": "tiny", "prompt": "hello"}), model)
    assert size.exact and size.tokens < 16
