"""Context buckets: the context an engine is loaded with, so requests of similar length share an engine (pure)."""

from __future__ import annotations

MIN_BUCKET = 4096


def context_bucket(tokens: int, n_ctx_train: int = 0) -> int:
    """The smallest power of two >= max(tokens, 4096), clamped to the model's trained context when it has one.

    Powers of two keep the number of distinct engines per model small (4k, 8k, ... 256k) while wasting at most
    half of the KV cache. When `tokens` exceeds `n_ctx_train` the result is `n_ctx_train`, below `tokens`:
    the caller refuses such a request.
    """
    bucket = MIN_BUCKET
    while bucket < tokens:
        bucket *= 2
    return min(bucket, n_ctx_train) if n_ctx_train > 0 else bucket
