"""The ollama API's routes (being built)."""

from __future__ import annotations

from aiohttp import web


def add_routes(app: web.Application) -> None:
    """Register the routes (none yet)."""
