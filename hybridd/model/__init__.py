"""Pure model arithmetic: GGUF metadata to a ModelSpec, and a ModelSpec plus run settings to bytes.

Nothing here does I/O, imports asyncio, logs, or touches a GPU library.
"""
