"""Serve an aiohttp app over TLS on a free loopback port, for the TLS and pairing tests."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator

from aiohttp import web


@contextlib.asynccontextmanager
async def serve(app: web.Application, context: ssl.SSLContext) -> AsyncIterator[str]:
    """Serve `app` with TLS on a free loopback port; yields its https base URL and always cleans up."""
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        yield f"https://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
