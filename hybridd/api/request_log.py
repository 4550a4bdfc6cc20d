"""One log line per answered request, for the journal: where it ran, how it went, and why it went there.

Written from the same record /metrics and the recent-requests ring get (hybridd/api/metrics.py: count_requests),
so nothing is measured twice. Keys are fixed and in a fixed order ("-" when unknown), the reason last and quoted:
    chat model=qwen3-8b placement=local status=200 ttft=0.12s tokens=64 tok/s=41.2 time=1.71s reason="local: ..."
"""

from __future__ import annotations

import logging

from hybridd.api.recent import Served

log = logging.getLogger("hybridd.request")


def request_line(served: Served) -> str:
    """The line for one answered request."""
    seen = served.observation
    ttft = f"{seen.first_token_s:.2f}s" if seen is not None and seen.first_token_s is not None else "-"
    tokens = str(seen.completion_tokens) if seen is not None and seen.completion_tokens else "-"
    tok_s = f"{seen.decode_tok_s:.1f}" if seen is not None and seen.decode_tok_s is not None else "-"
    reason = " ".join(served.reason.split()).replace("\\", "\\\\").replace('"', '\\"')
    return (f"{served.api} model={served.model} placement={served.placement or 'none'} status={served.status} "
            f"ttft={ttft} tokens={tokens} tok/s={tok_s} time={served.seconds:.2f}s reason=\"{reason}\"")


def log_served(served: Served) -> None:
    """Log one answered request: INFO, or WARNING when hybridd or its upstream failed it (5xx)."""
    log.log(logging.WARNING if served.status >= 500 else logging.INFO, "%s", request_line(served))
