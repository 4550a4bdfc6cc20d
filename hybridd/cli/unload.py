"""`hybridd unload`: stop the running daemon's idle engines, freeing their memory until a request needs them."""

from __future__ import annotations

from typing import Any

HELP = "stop the engines no request is using (their memory is free until the next request loads them again)"
UNLOAD_IDLE_PATH = "/hybridd/v1/unload-idle"  # hybridd.api.routes_engines; the CLI does not import the API
# The daemon does not drain busy engines (it keeps them); it waits for each idle one's process to exit.
WAITING_FOR = "the daemon to stop its idle engines"


def render_unloaded(result: dict[str, Any]) -> str:
    """What `hybridd unload` prints: each engine stopped, and those kept because a request holds them."""
    unloaded, busy = result.get("unloaded") or [], result.get("busy") or []
    lines = [f"unloaded {key}" for key in unloaded] or ["no idle engines to unload"]
    lines += [f"kept {key}: a request is using it" for key in busy]
    return "\n".join(lines)
