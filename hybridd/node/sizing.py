"""How many tokens a request needs: the model's own tokenizer where its GGUF is here, a safe guess elsewhere.

The tokenizer is a vocabulary-only llama.cpp load (no weights, a few MB), cached per model file. Chat requests
go through the GGUF's chat template as the engine applies it; without one, each message's text is tokenized and
charged a fixed overhead for the template's role markers.

Counting is bounded in time and memory whatever a body holds (up to the body cap). llama.cpp counts without
handing back a list of tokens. Counting stops once past the model's trained context, where the request is refused
however long it is, and a text whose length alone puts it past that (no token stands for more bytes than the
vocabulary's longest piece) is not read at all. A text over PIECE_BYTES is counted a piece at a time, because
llama.cpp's SPM tokenizer takes time quadratic in what one call is given (Gemma 3 on code: 50 ms for 64 KiB, 7 s
for 1 MiB, minutes for 15 MiB). Large requests are counted one at a time on a thread of their own, so small ones
never queue behind them.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import math
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hybridd.errors import BadRequest
from hybridd.node.prefixes import BlockChain, Fingerprint

log = logging.getLogger("hybridd.place")

# Roles, separators and the generation prompt that a chat template wraps around each message.
MESSAGE_OVERHEAD_TOKENS = 8
# Without a tokenizer: English runs ~4 bytes per token, indented code ~2.3 (Gemma 3 on Python); 2.0 over-counts
# both, which is the safe side.
BYTES_PER_TOKEN_GUESS = 2.0
# Counted in one call up to this; longer texts in pieces of it, cut after a newline or before a space, which costs at
# most a token or so per cut (the tokenizer cannot merge across it) and makes the count's time linear.
PIECE_BYTES = 64 * 1024
# The limit when a model's trained context is unknown (GGUFs state it): a bound on the work.
MAX_PROMPT_TOKENS = 1 << 20
# llama.cpp vocabulary types whose tokens each stand for a piece of the text as given: SPM, BPE, RWKV. (WPM and UGM
# normalize the text first, dropping or merging whitespace, so its length says nothing about their count.)
_PIECEWISE_VOCABS = (1, 2, 5)


@dataclass(frozen=True)
class PromptSize:
    """Tokens in a request's prompt, whether they were counted exactly, and the prompt's fingerprint (what engines'
    caches are matched against; None where the tokenizer is not here)."""

    tokens: int
    exact: bool
    fingerprint: Fingerprint | None = None


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


def request_chars(endpoint: str, body: dict[str, Any]) -> int:
    """Characters of text a request asks the model to read: what sizing it costs, before any template."""
    return sum(map(len, request_text(endpoint, body)))


class Vocab:
    """One GGUF's vocabulary-only llama.cpp load, counting tokens as the engine would (blocking: use in a thread)."""

    def __init__(self, path: Path) -> None:
        import llama_cpp  # deferred: loading llama.cpp's shared library costs a second at import

        self._llama = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        self._handle = self._llama._model.vocab
        self._formatter: Any = None
        self._longest: int | None = None

    def tokens(self, text: bytes, special: bool, chain: BlockChain | None = None) -> int:
        """Tokens in UTF-8 text, counted in one call; their ids go on to `chain` where one is given."""
        import llama_cpp

        if chain is None:
            # Given no room for them, llama.cpp answers minus the number of tokens.
            return abs(llama_cpp.llama_tokenize(self._handle, text, len(text), None, 0, False, special))
        # Real vocabularies make fewer tokens than bytes; a byte-fallback one may make more (a space becomes the
        # three bytes of "▁"): then llama.cpp says how many, and a second call takes them.
        room = len(text) + 16
        for _ in range(2):
            ids = (llama_cpp.llama_token * room)()
            n = llama_cpp.llama_tokenize(self._handle, text, len(text), ids, room, False, special)
            if n >= 0:
                break
            room = -n
        else:
            return -n
        chain.ids(memoryview(ids).cast("B")[:n * ctypes.sizeof(llama_cpp.llama_token)])
        return n

    def longest_piece(self) -> int | None:
        """The most bytes of text one token stands for; None when a count has no floor in the text's length."""
        if self._longest is None:
            import llama_cpp

            longest = 0
            if llama_cpp.llama_vocab_type(self._handle) in _PIECEWISE_VOCABS:
                buffer = ctypes.create_string_buffer(256)
                for token in range(llama_cpp.llama_vocab_n_tokens(self._handle)):
                    piece = abs(llama_cpp.llama_token_to_piece(self._handle, token, buffer, 256, 0, True))
                    longest = max(longest, piece)
                longest = max(longest, 4)  # an unknown character is one token, of up to 4 bytes
            self._longest = longest
        return self._longest or None

    def chat_prompt(self, body: dict[str, Any]) -> str | None:
        """The prompt the engine builds from body's messages with the GGUF's chat template; None without one."""
        formatter = self._chat_formatter()
        if formatter is None:
            return None
        import jinja2

        try:
            return str(formatter(messages=body.get("messages", []), tools=body.get("tools")).prompt)
        except (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError) as exc:
            # The engine renders the same template over the same messages, and would fail the same way.
            raise BadRequest(f"'messages' cannot be rendered by the model's chat template: {exc}", "messages") \
                from exc

    def _chat_formatter(self) -> Any:
        if self._formatter is None:
            self._formatter = False
            template = self._llama.metadata.get("tokenizer.chat_template")
            if template:
                from llama_cpp.llama_chat_format import Jinja2ChatFormatter

                vocab = self._llama
                eos = vocab._model.token_get_text(vocab.token_eos()) if vocab.token_eos() != -1 else ""
                bos = vocab._model.token_get_text(vocab.token_bos()) if vocab.token_bos() != -1 else ""
                try:
                    self._formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
                except Exception as exc:  # a template this Jinja cannot compile: the file's fault, not a request's
                    log.warning("chat template unusable (%s); counting messages without it", exc)
        return self._formatter or None

    def count(self, texts: list[str], special: bool, limit: int,
              chain: BlockChain | None = None) -> tuple[int, bool]:
        """Tokens in texts, and whether each was counted in one call (exact); their ids go on to `chain` where one
        is given. Past limit the count stops: it is then more than limit and less than the whole."""
        data = [_utf8(text) for text in texts]
        size = sum(map(len, data))
        longest = self.longest_piece() if size > PIECE_BYTES else None
        if longest is not None and size > limit * longest:
            return -(-size // longest), False  # at least this many tokens, without reading one
        n, whole = 0, True
        for text in data:
            for piece in _pieces(text):
                n += self.tokens(piece, special, chain)
                if n > limit:
                    return n, False
            whole = whole and len(text) <= PIECE_BYTES
        return n, whole


def _utf8(text: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError as exc:  # request parsing refuses these; llama.cpp must never see invalid UTF-8
        raise BadRequest(f"the prompt holds a lone surrogate (U+{ord(text[exc.start]):04X}) at character "
                         f"{exc.start}: text must be valid Unicode") from exc


def _pieces(text: bytes) -> Iterator[bytes]:
    """text in pieces of at most PIECE_BYTES, cut after a newline, else before a space, else between characters."""
    start = 0
    while len(text) - start > PIECE_BYTES:
        end = start + PIECE_BYTES
        cut = text.rfind(b"\n", start + PIECE_BYTES // 2, end) + 1
        if cut <= 0:
            cut = text.rfind(b" ", start + PIECE_BYTES // 2, end)
        if cut <= start:
            cut = end
            while text[cut] & 0xC0 == 0x80:  # a UTF-8 continuation byte: back to the character's start
                cut -= 1
        yield text[start:cut]
        start = cut
    yield text[start:]


class Tokenizers:
    """Vocabulary-only llama.cpp loads, one per GGUF file, shared by every request for that model."""

    def __init__(self) -> None:
        self._vocabs: dict[Path, Vocab] = {}
        self._lock = threading.Lock()
        # One thread for large counts: however many arrive, they take one core and none of asyncio's default threads.
        self._large = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hybridd-sizing")

    def _vocab(self, path: Path) -> Vocab:
        with self._lock:
            vocab = self._vocabs.get(path)
            if vocab is None:
                vocab = self._vocabs[path] = Vocab(path)
            return vocab

    async def load(self, path: Path) -> None:
        """Load the vocabulary of the model at path, off the event loop; raises what llama.cpp raises."""
        if path not in self._vocabs:
            await asyncio.to_thread(self._vocab, path)

    async def size(self, path: Path, endpoint: str, body: dict[str, Any], limit: int = 0) -> PromptSize:
        """count, off the event loop: a small request at once, a large one when the large requests before it are
        done. A client that leaves while its request waits takes it out of the queue."""
        if request_chars(endpoint, body) <= PIECE_BYTES:
            return await asyncio.to_thread(self.count, path, endpoint, body, limit)
        return await asyncio.get_running_loop().run_in_executor(self._large, self.count, path, endpoint, body, limit)

    def count(self, path: Path, endpoint: str, body: dict[str, Any], limit: int = 0) -> PromptSize:
        """Prompt tokens for body against the model at path, counted no further than limit (the model's trained
        context; 0: unknown) (blocking: run it in a thread). Raises BadRequest for a body the model's chat template
        cannot render."""
        vocab = self._vocab(path)
        prompt = vocab.chat_prompt(body) if endpoint == "chat" else None
        if prompt is not None:
            texts, special, extra, exact = [prompt], True, 0, True
        else:
            texts, special, exact = request_text(endpoint, body), False, endpoint != "chat"
            extra = MESSAGE_OVERHEAD_TOKENS * len(body.get("messages", [])) if endpoint == "chat" else 1
        extra += token_ids_in(endpoint, body)
        chain = BlockChain()  # the same pass fingerprints the prompt: a few ms per 100k tokens
        n, whole = vocab.count(texts, special, (limit or MAX_PROMPT_TOKENS) - extra, chain)
        return PromptSize(n + extra, exact and whole, chain.fingerprint(n))
