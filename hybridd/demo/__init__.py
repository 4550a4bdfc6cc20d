"""Demo support: a small model to serve with no config, tiny generated GGUFs, and `hybridd demo`'s two nodes."""
