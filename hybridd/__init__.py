"""hybridd: one local OpenAI-compatible endpoint; serves what fits on local GPUs, forwards the rest to a peer."""

__version__ = "0.1.0"
