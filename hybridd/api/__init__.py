"""The aiohttp application: OpenAI routes, streaming pass-through, guards, status."""
