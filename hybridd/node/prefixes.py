"""What each engine's KV cache holds of a prompt: fingerprints of token prefixes, and who was last given which.

Agents resend the whole conversation every turn. llama-server and llama-cpp-python keep the last prompt of each
slot in its KV cache and prefill only past the longest prefix a new prompt shares with it, so the engine that served
the last turn prefills only the new tokens. A prompt's fingerprint is the chain of hashes of its whole blocks of
BLOCK_TOKENS tokens (block i's hash covers block i-1's), so two prompts share k leading blocks exactly when their
first k hashes are equal, and the prefix they share is k * BLOCK_TOKENS tokens (within a block). 8 bytes per block:
3 KiB for a 100k-token prompt.

The tracker models, per local engine, each slot (llama-server `-np N`; one for llama-cpp-python): a request lands on
the free slot whose prefix it matches longest (llama-server picks a slot by prompt similarity), else on the least
recently used free one, whose prefix it then replaces; what a peer was last sent of each model is taken to be held
by the peer's engine. An engine loaded anew (or gone) holds nothing. Memory is bounded: MAX_ENGINES engines and
MAX_PEER_ENTRIES peer entries, least recently used dropped first, MAX_BLOCKS blocks per fingerprint.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

BLOCK_TOKENS = 256
DIGEST_BYTES = 8
MAX_BLOCKS = 4096  # 1M tokens: the longest prompt a fingerprint follows (32 KiB)
MAX_ENGINES = 64
MAX_PEER_ENTRIES = 64
# What a peer's engine of one model is taken to hold: the last few conversations forwarded there (its engine runs
# slots too, or a prefix cache of many).
PEER_PREFIXES = 4
PEER_PREFIX = "peer:"


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """A prompt's token prefix, cheaply: the chained hash of each whole block, and the prompt's length in tokens."""

    digests: bytes = b""  # DIGEST_BYTES per whole block, in order
    tokens: int = 0

    @property
    def blocks(self) -> int:
        """Whole blocks fingerprinted."""
        return len(self.digests) // DIGEST_BYTES

    def shared(self, other: Fingerprint) -> int:
        """Tokens of this prompt that `other` holds: the leading blocks both have, times BLOCK_TOKENS (a binary
        search: block i equal means every block before it is too)."""
        lo, hi = 0, min(self.blocks, other.blocks)
        while lo < hi:  # the most leading blocks equal: the largest k with block k-1 equal
            mid = (lo + hi + 1) // 2
            at = (mid - 1) * DIGEST_BYTES
            if self.digests[at:at + DIGEST_BYTES] == other.digests[at:at + DIGEST_BYTES]:
                lo = mid
            else:
                hi = mid - 1
        return min(lo * BLOCK_TOKENS, self.tokens)

    @classmethod
    def of_blocks(cls, blocks: Iterable[bytes], tokens: int) -> Fingerprint:
        """The fingerprint of a prompt of `tokens` tokens whose whole blocks are given as bytes, in order."""
        chain = BlockChain()
        for block in blocks:
            chain.block(block)
        return chain.fingerprint(tokens)


class BlockChain:
    """Builds a Fingerprint from token ids fed in any number of pieces."""

    def __init__(self) -> None:
        self._digests = bytearray()
        self._last = b""
        self._pending = bytearray()  # the ids of the block being filled, 4 bytes each

    def block(self, data: bytes) -> None:
        """One whole block's content: its hash chains the previous one."""
        if len(self._digests) < MAX_BLOCKS * DIGEST_BYTES:
            self._last = hashlib.blake2b(self._last + data, digest_size=DIGEST_BYTES).digest()
            self._digests += self._last

    def ids(self, data: bytes | memoryview) -> None:
        """Token ids as 4-byte integers (a ctypes int32 array's bytes), continuing the prompt."""
        size = BLOCK_TOKENS * 4
        data = memoryview(data)
        if self._pending:  # complete the block left open by the last piece
            take = size - len(self._pending)
            self._pending += data[:take]
            data = data[take:]
            if len(self._pending) < size:
                return
            self.block(bytes(self._pending))
            self._pending.clear()
        whole = len(data) - len(data) % size
        for at in range(0, whole, size):  # hashed where they lie: no copy of a long prompt's ids
            self.block(bytes(data[at:at + size]))
        self._pending += data[whole:]

    def fingerprint(self, tokens: int) -> Fingerprint:
        """The prompt so far, `tokens` long (its last partial block is not part of any match)."""
        return Fingerprint(bytes(self._digests), tokens)


@dataclass(slots=True)
class _Slot:
    held: Fingerprint = field(default_factory=Fingerprint)
    last_used: float = 0.0
    busy: int = 0


class PrefixTracker:
    """Which prefix each local engine slot and each peer holds (the node's own record; not placement state)."""

    def __init__(self) -> None:
        self._engines: OrderedDict[str, list[_Slot]] = OrderedDict()
        self._peers: OrderedDict[tuple[str, str], list[Fingerprint]] = OrderedDict()

    def cached(self, prompt: Fingerprint, engines: Iterable[str], peers: Iterable[str], model: str) -> dict[str, int]:
        """Tokens of `prompt` each engine (by key) and each peer (`peer:<name>`) holds, those holding any."""
        held = {key: self.held(key, prompt) for key in engines}
        held |= {f"{PEER_PREFIX}{name}": self.held_by_peer(name, model, prompt) for name in peers}
        return {key: n for key, n in held.items() if n > 0}

    def held(self, key: str, prompt: Fingerprint) -> int:
        """The longest prefix of `prompt` one slot of engine `key` holds."""
        return max((slot.held.shared(prompt) for slot in self._engines.get(key, ())), default=0)

    def held_by_peer(self, peer: str, model: str, prompt: Fingerprint) -> int:
        """The longest prefix of `prompt` among what `peer` was last sent of `model`."""
        return max((held.shared(prompt) for held in self._peers.get((peer, model), ())), default=0)

    def admit(self, key: str, slots: int, prompt: Fingerprint, now: float) -> int:
        """`prompt` goes to engine `key`: the slot it lands on now holds it; returns that slot (release it when
        the request ends)."""
        engine = self._engine(key, slots)
        free = [i for i, slot in enumerate(engine) if not slot.busy] or list(range(len(engine)))
        best = max(free, key=lambda i: (engine[i].held.shared(prompt), -engine[i].last_used))
        if engine[best].held.shared(prompt) == 0:
            best = min(free, key=lambda i: engine[i].last_used)
        slot = engine[best]
        slot.held, slot.last_used, slot.busy = prompt, now, slot.busy + 1
        return best

    def release(self, key: str, slots: int, slot: int, prompt: Fingerprint | None, now: float) -> None:
        """The request on `slot` of engine `key` ended: the slot holds its `prompt` (None: it failed before the
        engine answered, so what the slot holds is unknown). An engine loaded while the request waited for it
        started empty: the slot holds the prompt all the same."""
        engine = self._engine(key, slots)
        target = engine[min(slot, len(engine) - 1)]
        target.busy = max(0, target.busy - 1)
        target.held = prompt or Fingerprint()
        target.last_used = now

    def forwarded(self, peer: str, model: str, prompt: Fingerprint) -> None:
        """`prompt` was sent to `peer` for `model`: it replaces the entries it continues (all of whose blocks it
        shares), else the oldest."""
        entry = (peer, model)
        held = [h for h in self._peers.pop(entry, []) if h.shared(prompt) < h.blocks * BLOCK_TOKENS]
        self._peers[entry] = [prompt, *held][:PEER_PREFIXES]
        while len(self._peers) > MAX_PEER_ENTRIES:
            self._peers.popitem(last=False)

    def forget(self, key: str) -> None:
        """Engine `key` was loaded anew or is gone: its cache is empty."""
        self._engines.pop(key, None)

    def snapshot(self) -> Mapping[str, tuple[int, ...]]:
        """Tokens each engine slot holds (for status and tests)."""
        return {key: tuple(slot.held.tokens for slot in engine) for key, engine in self._engines.items()}

    def _engine(self, key: str, slots: int) -> list[_Slot]:
        engine = self._engines.pop(key, None)
        if engine is None or len(engine) != slots:
            engine = [_Slot() for _ in range(max(1, slots))]
        self._engines[key] = engine
        while len(self._engines) > MAX_ENGINES:
            self._engines.popitem(last=False)
        return engine
