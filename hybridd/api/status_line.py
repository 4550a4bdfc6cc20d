"""The node in one line, for systemd's STATUS= (what `systemctl status hybridd` shows): where it serves, the
models loaded, the peers up, the fine-tuning jobs."""

from __future__ import annotations

from aiohttp import web

from hybridd.api import keys
from hybridd.engine.base import EngineState


def status_line(app: web.Application, url: str) -> str:
    """The line for this app's node now; read from its state, cheap enough for every few seconds."""
    loaded: list[str] = []
    peers_up: list[str] = []
    peers_all: set[str] = set()
    running = waiting = 0
    if keys.ROUTER in app:  # the engines are set up
        for slot in app[keys.POOL].slots.values():
            if slot.state is EngineState.READY and slot.model.name not in loaded:
                loaded.append(slot.model.name)
        for name, target in app[keys.ROUTER].peer_targets().items():
            peers_all.add(name)
            if target.state.up:
                peers_up.append(name)
    if keys.PEER in app:  # paired, linked or not
        peers_all.update(peer.name for peer in app[keys.PEER].store.all())
    if keys.TRAININGS in app:
        for job in app[keys.TRAININGS].store.active():
            if job.status == "running":
                running += 1
            else:
                waiting += 1
    return render_status_line(url, loaded, sorted(peers_up), len(peers_all), running, waiting)


def render_status_line(url: str, loaded: list[str], peers_up: list[str], peers: int, jobs_running: int,
                       jobs_waiting: int) -> str:
    """E.g. "serving on http://127.0.0.1:11435; loaded: qwen3-8b; peers up: spark (1 of 1); jobs: 1 running"."""
    parts = [f"serving on {url}", "loaded: " + ", ".join(loaded) if loaded else "no model loaded"]
    if peers:
        parts.append(f"peers up: {', '.join(peers_up) or 'none'} ({len(peers_up)} of {peers})")
    if jobs_running or jobs_waiting:
        jobs = [f"{jobs_running} running"] if jobs_running else []
        jobs += [f"{jobs_waiting} waiting"] if jobs_waiting else []
        parts.append("jobs: " + ", ".join(jobs))
    return "; ".join(parts)
