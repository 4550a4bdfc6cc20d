"""Prompt fingerprints and the prefix tracker: block matching, slots, peers, the memory bound."""

from __future__ import annotations

from pathlib import Path

from hybridd.node.prefixes import (
    BLOCK_TOKENS,
    MAX_BLOCKS,
    MAX_ENGINES,
    BlockChain,
    Fingerprint,
    PrefixTracker,
)
from hybridd.node.sizing import Tokenizers


def conversation(name: str, blocks: int, shared: int = 0, base: str = "main") -> Fingerprint:
    """A prompt of `blocks` whole blocks (+ 100 tokens), its first `shared` blocks those of `base`."""
    content = [f"{base}-{i}".encode() if i < shared else f"{name}-{i}".encode() for i in range(blocks)]
    return Fingerprint.of_blocks(content, blocks * BLOCK_TOKENS + 100)


def test_the_shared_prefix_is_the_leading_equal_blocks() -> None:
    turn1 = conversation("main", 10)
    turn2 = conversation("main", 14)
    sub = conversation("sub", 12, shared=6)
    assert turn2.shared(turn1) == turn1.shared(turn2) == 10 * BLOCK_TOKENS
    assert sub.shared(turn2) == 6 * BLOCK_TOKENS  # forked after 6 blocks of the main agent's prompt
    assert conversation("other", 10).shared(turn1) == 0
    assert Fingerprint().shared(turn1) == 0
    # a block that differs hides every block after it, even equal ones (the hash chains)
    edited = Fingerprint.of_blocks([b"x" if i == 3 else f"main-{i}".encode() for i in range(10)], 2660)
    assert edited.shared(turn1) == 3 * BLOCK_TOKENS


def test_ids_fed_in_pieces_fingerprint_as_one_run() -> None:
    ids = bytes(range(256)) * 17  # 1088 ids of 4 bytes: 4 whole blocks and a part
    whole, pieces = BlockChain(), BlockChain()
    whole.ids(ids)
    for at in range(0, len(ids), 999):
        pieces.ids(ids[at:at + 999])
    a, b = whole.fingerprint(1088), pieces.fingerprint(1088)
    assert a == b and a.blocks == 4 and a.shared(b) == 4 * BLOCK_TOKENS


def test_a_fingerprint_is_bounded() -> None:
    chain = BlockChain()
    for i in range(MAX_BLOCKS + 50):
        chain.block(i.to_bytes(4, "little"))
    assert chain.fingerprint(10**7).blocks == MAX_BLOCKS


def test_a_request_lands_on_the_slot_holding_its_prefix_else_the_least_recently_used() -> None:
    tracker = PrefixTracker()
    a1, b1 = conversation("a", 8), conversation("b", 8)
    slot_a = tracker.admit("m@8192", 2, a1, now=1.0)
    slot_b = tracker.admit("m@8192", 2, b1, now=2.0)
    assert slot_a != slot_b
    tracker.release("m@8192", 2, slot_a, a1, now=1.5)
    tracker.release("m@8192", 2, slot_b, b1, now=2.5)
    a2 = conversation("a", 12)
    assert tracker.cached(a2, ["m@8192", "n@8192"], [], "m") == {"m@8192": 8 * BLOCK_TOKENS}
    assert tracker.admit("m@8192", 2, a2, now=3.0) == slot_a  # its own slot, though b's was used later
    tracker.release("m@8192", 2, slot_a, a2, now=3.5)
    c = conversation("c", 4)
    assert tracker.admit("m@8192", 2, c, now=4.0) == slot_b  # no match: the least recently used slot, b's
    assert tracker.held("m@8192", conversation("b", 9)) == 0  # replaced
    assert tracker.held("m@8192", conversation("a", 13)) == 12 * BLOCK_TOKENS


def test_a_busy_slot_is_not_taken_while_a_free_one_is_there() -> None:
    tracker = PrefixTracker()
    a = conversation("a", 8)
    busy = tracker.admit("m@8192", 2, a, now=1.0)  # not released: its request still runs
    assert tracker.admit("m@8192", 2, conversation("a", 10), now=2.0) != busy
    assert tracker.held("m@8192", a) == 8 * BLOCK_TOKENS


def test_a_failed_request_and_a_reloaded_engine_hold_nothing() -> None:
    tracker = PrefixTracker()
    a = conversation("a", 8)
    tracker.release("m@8192", 1, tracker.admit("m@8192", 1, a, now=1.0), None, now=1.5)
    assert tracker.held("m@8192", a) == 0
    tracker.release("m@8192", 1, tracker.admit("m@8192", 1, a, now=2.0), a, now=2.5)
    tracker.forget("m@8192")
    assert tracker.held("m@8192", a) == 0
    # a request admitted before its engine finished loading: the load empties the engine, the answer fills its slot
    slot = tracker.admit("m@8192", 1, a, now=3.0)
    tracker.forget("m@8192")
    tracker.release("m@8192", 1, slot, a, now=4.0)
    assert tracker.held("m@8192", a) == 8 * BLOCK_TOKENS


def test_a_peer_holds_the_conversations_last_forwarded_there() -> None:
    tracker = PrefixTracker()
    main1, sub = conversation("main", 40), conversation("sub", 30, shared=20)
    tracker.forwarded("spark", "glm", main1)
    tracker.forwarded("spark", "glm", sub)
    main2 = conversation("main", 44)
    assert tracker.cached(main2, [], ["spark", "other"], "glm") == {"peer:spark": 40 * BLOCK_TOKENS}
    assert tracker.held_by_peer("spark", "qwen", main2) == 0  # another model's engine
    tracker.forwarded("spark", "glm", main2)  # replaces main1, keeps sub
    assert tracker.held_by_peer("spark", "glm", conversation("sub", 31, shared=20)) == 30 * BLOCK_TOKENS
    for i in range(8):
        tracker.forwarded("spark", "glm", conversation(f"x{i}", 4))
    assert tracker.held_by_peer("spark", "glm", main2) == 0  # the oldest went


def test_engines_beyond_the_bound_are_dropped_least_recently_used_first() -> None:
    tracker = PrefixTracker()
    prompt = conversation("a", 4)
    for i in range(MAX_ENGINES + 1):
        tracker.admit(f"m@{i}", 1, prompt, now=float(i))
    assert len(tracker.snapshot()) == MAX_ENGINES
    assert tracker.held("m@0", prompt) == 0 and tracker.held(f"m@{MAX_ENGINES}", prompt) == 4 * BLOCK_TOKENS


def test_sizing_fingerprints_a_chat_in_the_same_pass(tiny_model: Path) -> None:
    tokenizers = Tokenizers()
    history = [{"role": "system", "content": "You are terse. " * 300}]
    for turn in range(3):
        history += [{"role": "user", "content": f"question {turn}: " + "why is the sky blue? " * 60},
                    {"role": "assistant", "content": "Rayleigh scattering. " * 40}]
    first = tokenizers.count(tiny_model, "chat", {"messages": history[:3]})
    second = tokenizers.count(tiny_model, "chat", {"messages": [*history, {"role": "user", "content": "and?"}]})
    assert first.fingerprint is not None and second.fingerprint is not None
    assert first.fingerprint.tokens == first.tokens and first.fingerprint.blocks == first.tokens // BLOCK_TOKENS
    held = second.fingerprint.shared(first.fingerprint)
    assert first.tokens - 2 * BLOCK_TOKENS < held <= first.tokens  # all of turn one but the block it ends in
    other = tokenizers.count(tiny_model, "chat", {"messages": [{"role": "system", "content": "Be verbose. " * 300}]})
    assert other.fingerprint is not None and other.fingerprint.shared(first.fingerprint) == 0
