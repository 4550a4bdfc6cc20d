"""Other APIs' requests as chat completions, and chat-completion answers back as theirs (pure: no I/O).

Each module maps one API: its request to the chat completion an engine runs, and the engine's answer, whole or
streamed chunk by chunk, to that API's answer (the Translator protocol in hybridd/api/proxy.py)."""
