"""Config text for the two-node tests: a node with one tiny model under a memory budget."""

from __future__ import annotations

from pathlib import Path


def node_config(model: Path, name: str, role: str, budget: int = 4_000_000_000, *, lan_listen: str | None = None,
                bandwidth: float | None = None, ctx: int = 4096, node_extra: str = "", extra: str = "") -> str:
    """A node serving model as "a" on a budget device; a peer listens for paired nodes (loopback by default)."""
    if lan_listen is None and role == "peer":
        lan_listen = "127.0.0.1:0"
    lan = f'lan_listen = "{lan_listen}"' if lan_listen else ""
    speed = f"bandwidth_bytes_s = {bandwidth}" if bandwidth is not None else ""
    return f"""
[server]
listen = "127.0.0.1:0"
{lan}
[node]
name = "{name}"
role = "{role}"
hardware = "dgx-spark"
ram_bytes = 200_000
{node_extra}
[[node.devices]]
name = "budget0"
memory_bytes = {budget}
{speed}
[[models]]
name = "a"
path = "{model}"
ctx = {ctx}
{extra}"""
