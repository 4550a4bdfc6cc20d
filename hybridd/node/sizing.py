"""How many tokens a request needs: the model's own tokenizer where its GGUF is here, a safe guess elsewhere.

The tokenizer is a vocabulary-only llama.cpp load (no weights, a few MB), cached per model file. Chat requests
go through the GGUF's chat template as the engine applies it; without one, each message's text is tokenized and
charged a fixed overhead for the template's role markers.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Roles, separators and the generation prompt that a chat template wraps around each message.
MESSAGE_OVERHEAD_TOKENS = 8
# Without a tokenizer: English runs ~4 bytes per token, indented code ~2.3 (Gemma 3 on Python); 2.0 over-counts
# both, which is the safe side.
BYTES_PER_TOKEN_GUESS = 2.0


@dataclass(frozen=True)
class PromptSize:
    """Tokens in a request's prompt and whether they were counted exactly."""

    tokens: int
    exact: bool


def request_text(endpoint: str, body: dict[str, Any]) -> list[str]:
    """The texts a request asks the model to read, in order."""
    if endpoint == "chat":
        texts = []
        for message in body.get("messages", []):
            content = message.get("content")
            if isinstance(content, str):
                texts.append(content)
            elif isinstance(content, list):
                texts += [part.get("text", "") for part in content if isinstance(part, dict)]
            if message.get("tool_calls"):
                texts.append(json.dumps(message["tool_calls"]))
        if body.get("tools"):
            texts.append(json.dumps(body["tools"]))
        return texts
    prompt = body.get("prompt") if endpoint == "completion" else body.get("input")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list):
        return [item for item in prompt if isinstance(item, str)]
    return []


def token_ids_in(endpoint: str, body: dict[str, Any]) -> int:
    """Tokens a completion or embedding request already sends as token ids."""
    prompt = body.get("prompt") if endpoint == "completion" else body.get("input")
    if not isinstance(prompt, list):
        return 0
    return sum(1 if isinstance(item, int) else len(item) if isinstance(item, list) else 0 for item in prompt)


def guess_tokens(endpoint: str, body: dict[str, Any]) -> PromptSize:
    """A conservative count from byte lengths, for models whose tokenizer is not here."""
    texts = request_text(endpoint, body)
    n = sum(math.ceil(len(text.encode()) / BYTES_PER_TOKEN_GUESS) for text in texts)
    n += MESSAGE_OVERHEAD_TOKENS * len(body.get("messages", [])) + token_ids_in(endpoint, body)
    return PromptSize(n, exact=False)


class Tokenizers:
    """Vocabulary-only llama.cpp loads, one per GGUF file, shared by every request for that model."""

    def __init__(self) -> None:
        self._vocabs: dict[Path, Any] = {}
        self._lock = threading.Lock()

    def _vocab(self, path: Path) -> Any:
        with self._lock:
            vocab = self._vocabs.get(path)
            if vocab is None:
                import llama_cpp  # deferred: loading llama.cpp's shared library costs a second at import


                vocab = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
                self._vocabs[path] = vocab
            return vocab

    def count(self, path: Path, endpoint: str, body: dict[str, Any]) -> PromptSize:
        """Exact prompt tokens for body against the model at path (blocking: run it in a thread)."""
        vocab = self._vocab(path)
        template = vocab.metadata.get("tokenizer.chat_template") if endpoint == "chat" else None
        if template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            eos = vocab._model.token_get_text(vocab.token_eos()) if vocab.token_eos() != -1 else ""
            bos = vocab._model.token_get_text(vocab.token_bos()) if vocab.token_bos() != -1 else ""
            prompt = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)(
                messages=body.get("messages", []), tools=body.get("tools")).prompt
            return PromptSize(len(vocab.tokenize(prompt.encode(), add_bos=False, special=True)), exact=True)
        texts = request_text(endpoint, body)
        n = sum(len(vocab.tokenize(text.encode(), add_bos=False, special=False)) for text in texts)
        n += (MESSAGE_OVERHEAD_TOKENS * len(body.get("messages", [])) if endpoint == "chat" else 1)
        return PromptSize(n + token_ids_in(endpoint, body), exact=endpoint != "chat")
