"""The models this node serves (configured entries, GGUF files found in library dirs, or the demo default), and the
header each is sized by."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from hybridd.config import Config, ModelEntry
from hybridd.errors import Conflict, HybriddError, ModelNotFound
from hybridd.model.header import GgufHeader
from hybridd.probe.gguf_file import read_gguf_header
from hybridd.probe.model_profiles import load_profile, profile_header

log = logging.getLogger("hybridd")


@dataclass
class Catalog:
    """Model ids and aliases to entries; the answer to 'what can I ask for'. Configured entries come first;
    fine-tuned models join it as their jobs finish (`add`)."""

    models: tuple[ModelEntry, ...]
    refused: dict[str, str] = field(default_factory=dict)  # fine-tuned ids this node will not serve, and why

    def add(self, entry: ModelEntry) -> None:
        """Serve one more model (a fine-tuned one); an entry of the same name is replaced."""
        self.models = (*(m for m in self.models if m.name != entry.name), entry)
        self.refused.pop(entry.name, None)

    def refuse(self, name: str, why: str) -> None:
        """Name a model this node knows of but will not serve (a fine-tune whose base is not here as trained)."""
        self.remove(name)
        self.refused[name] = why

    def remove(self, name: str) -> None:
        """Stop listing the model named `name` (nothing when there is none)."""
        self.models = tuple(m for m in self.models if m.name != name)

    def resolve(self, name: str) -> ModelEntry:
        """The entry whose name or alias is name; ModelNotFound lists what exists."""
        for model in self.models:
            if name == model.name or name in model.aliases:
                return model
        if name in self.refused:
            raise Conflict(f"model '{name}' is not served here: {self.refused[name]}")
        known = ", ".join(m.name for m in self.models) or "none configured"
        raise ModelNotFound(f"model '{name}' does not exist here (available: {known})")


def model_id_for(path: Path) -> str:
    """The id a scanned GGUF is served under: its file stem, split suffix dropped, lower case."""
    stem = path.name.removesuffix(".gguf")
    if split_part(path) is not None:
        stem = stem.rsplit("-", 3)[0]
    return stem.lower()


def split_part(path: Path) -> int | None:
    """N for a split GGUF named ...-0000N-of-0000M.gguf, None for a single file."""
    parts = path.name.removesuffix(".gguf").rsplit("-", 3)
    # Qwen3-...-00001-of-00003.gguf is one model in three files; llama.cpp opens the first.
    if len(parts) == 4 and parts[2] == "of" and parts[1].isdigit() and parts[3].isdigit():
        return int(parts[1])
    return None


def scan_library(dirs: Iterable[Path]) -> list[Path]:
    """GGUF files under dirs (first part only of split files), sorted; unreadable dirs are skipped."""
    found: list[Path] = []
    for folder in dirs:
        if not folder.is_dir():
            log.warning("library dir %s does not exist; skipping it", folder)
            continue
        for path in sorted(folder.rglob("*.gguf")):
            if split_part(path) not in (None, 1):
                continue
            if "mmproj" in path.name.lower():
                continue  # vision projectors are not models of their own
            found.append(path)
    return found


def build_catalog(config: Config, scanned: Iterable[Path]) -> Catalog:
    """Configured models first; scanned files add ids not already taken, with the engine defaults."""
    models = list(config.models)
    taken = {name for m in models for name in (m.name, *m.aliases)}
    configured_paths = {m.path.resolve() for m in models if m.path is not None}
    defaults = config.engine
    for path in scanned:
        name = model_id_for(path)
        if name in taken or path.resolve() in configured_paths:
            continue
        taken.add(name)
        models.append(defaults.entry(name, path))
    return Catalog(tuple(models))


def with_demo_model(config: Config, path: Path, name: str, options: dict[str, str]) -> Config:
    """The config plus one demo model entry (used when no config file exists at all)."""
    demo = config.engine.entry(name, path, aliases=("default",), options={**config.engine.options, **options})
    return replace(config, models=(*config.models, demo))


def entry_header(model: ModelEntry) -> GgufHeader:
    """A configured model's header: from its GGUF file, else from its profile (peer-only models)."""
    if model.path is not None:
        return read_gguf_header(model.path)
    if model.profile is not None:
        return profile_header(load_profile(model.profile), model.quant)
    raise HybriddError(f"model '{model.name}' has neither a GGUF path nor a profile to size it by")
