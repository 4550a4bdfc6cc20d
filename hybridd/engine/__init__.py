"""Managed OpenAI-compatible engine processes (llama-cpp-python by default) and external upstreams."""
