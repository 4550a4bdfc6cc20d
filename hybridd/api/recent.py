"""The last requests this node answered, each with where it ran and why: a small ring for status and the dashboard.

Fed from where /metrics observes a finished request (hybridd/api/metrics.py: count_requests), so both see the same
requests. Bounded: the oldest entry goes when a new one comes.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from hybridd.place.state import Observation

RECENT_KEPT = 32
REASON_CHARS = 300  # a reason is one line; an error message read back from a body is cut to this


@dataclass(frozen=True, slots=True)
class Served:
    """One answered request: what it asked for, where it ran and why, and what came back."""

    at: float  # wall clock, when the answer ended
    api: str  # chat, completion, messages, responses, ollama, ... (as /metrics labels it)
    model: str  # a model this node serves, or "unknown"
    placement: str  # local, local-offload, peer:<name>, or "" when it was not placed (an error before)
    reason: str  # x-hybridd-reason, or the error's message when there was none
    status: int
    seconds: float
    observation: Observation | None = None  # None: nothing reached an upstream

    def to_json(self) -> dict[str, object]:
        seen = self.observation
        return {
            "at": round(self.at, 3), "api": self.api, "model": self.model, "placement": self.placement or None,
            "reason": self.reason, "status": self.status, "seconds": round(self.seconds, 3),
            "first_token_s": round(seen.first_token_s, 3) if seen and seen.first_token_s is not None else None,
            "tokens": seen.completion_tokens if seen and seen.completion_tokens else None,
            "tok_s": round(seen.decode_tok_s, 1) if seen and seen.decode_tok_s is not None else None,
        }


class RecentRequests:
    """The last `kept` requests served, oldest first; `on_added` is told of each new one."""

    def __init__(self, kept: int = RECENT_KEPT) -> None:
        self._served: collections.deque[Served] = collections.deque(maxlen=kept)
        self.on_added: Callable[[], None] = lambda: None

    def __len__(self) -> int:
        return len(self._served)

    def add(self, served: Served) -> None:
        self._served.append(served)
        self.on_added()

    def to_json(self) -> list[dict[str, object]]:
        return [s.to_json() for s in self._served]


RECENT = web.AppKey("recent_requests", RecentRequests)


def reason_of(response: web.StreamResponse) -> str:
    """Why the request went where it went (its x-hybridd-reason), else the message of the error it got."""
    reason = response.headers.get("x-hybridd-reason")
    if reason:
        return reason[:REASON_CHARS]
    if response.status < 400 or not isinstance(response, web.Response) or not isinstance(response.body, bytes):
        return ""
    try:
        message = json.loads(response.body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return ""
    return message[:REASON_CHARS] if isinstance(message, str) else ""
