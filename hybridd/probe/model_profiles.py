"""Model profiles: TOML files of GGUF metadata keys and per-quant file sizes, for planning without the file.

A profile goes through the same spec code as a real GGUF: `profile_header` synthesizes tensor infos from the
metadata and a quant's file size (hybridd.model.synth). Profiles live in `<repo>/profiles/models/*.toml`, or in
`$HYBRIDD_PROFILES_DIR/models` when that variable names another `profiles` folder.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hybridd.errors import ModelProfileError
from hybridd.model.header import GgufHeader
from hybridd.model.synth import synth_tensors
from hybridd.validate import Reader

PROFILES_ENV = "HYBRIDD_PROFILES_DIR"
_REPO_PROFILES = Path(__file__).resolve().parents[2] / "profiles"
# The name callers catch: a model profile's ProfileError, also a ValueError (see hybridd.errors).
ProfileError = ModelProfileError


@dataclass(frozen=True, slots=True)
class QuantProfile:
    """One published quantization of a model: its file size and where that number comes from."""

    name: str
    file_bytes: int
    source: str = ""


@dataclass(frozen=True, slots=True)
class ModelProfile:
    """A model known by its GGUF metadata keys and the file sizes of its quantizations."""

    name: str
    description: str
    metadata: dict[str, Any]
    quants: dict[str, QuantProfile]
    sources: tuple[str, ...] = field(default=())

    @property
    def architecture(self) -> str:
        """`general.architecture` of the profile."""
        return str(self.metadata.get("general.architecture", ""))


def models_dir() -> Path:
    """The folder of model profiles: $HYBRIDD_PROFILES_DIR/models, else <repo>/profiles/models."""
    base = os.environ.get(PROFILES_ENV)
    return (Path(base) if base else _REPO_PROFILES) / "models"


def parse_profile(data: dict[str, Any], origin: str) -> ModelProfile:
    """Validate a decoded TOML document; errors name `origin` and the dotted key."""
    doc = Reader(data, ModelProfileError, prefix=f"{origin}: ").table()
    name = doc.at("name").text()
    metadata = doc.at("metadata").table()
    if not metadata.value:
        raise metadata.fail("required table of GGUF metadata keys")
    arch = metadata.at("general.architecture").text()
    metadata.at(f"{arch}.block_count").integer()
    quants_table = doc.at("quants").entries(optional=True)
    if not quants_table:
        raise doc.at("quants").fail("at least one [quants.NAME] table with file_bytes")
    quants = {}
    for qname, q in quants_table.items():
        quant = q.table()
        size = quant.at("file_bytes").integer(above=0)
        quants[qname] = QuantProfile(qname, size, str(quant.value.get("source", "")))
    sources = data.get("sources", [])
    return ModelProfile(name, str(data.get("description", "")), dict(metadata.value), quants,
                        tuple(str(s) for s in sources) if isinstance(sources, list) else ())


def list_profiles(directory: Path | None = None) -> list[str]:
    """Names (file stems) of the profiles in `directory` (default: models_dir()), sorted."""
    folder = directory or models_dir()
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.toml"))


def load_profile(name: str, directory: Path | None = None) -> ModelProfile:
    """Read and validate profile `name`; ModelProfileError names the valid choices when it does not exist."""
    folder = directory or models_dir()
    path = folder / f"{name}.toml"
    if not path.is_file():
        raise ModelProfileError(f"unknown model profile {name!r} (valid: {', '.join(list_profiles(folder)) or 'none'})")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ModelProfileError(f"{path}: {exc}") from exc
    return parse_profile(data, str(path))


def profile_header(profile: ModelProfile, quant: str | None = None, file_bytes: int | None = None) -> GgufHeader:
    """A GgufHeader for `profile` at `quant` (default: the first listed) with synthesized tensor infos, of the
    quant's published size or `file_bytes`."""
    if quant is None:
        quant = next(iter(profile.quants))
    try:
        q = profile.quants[quant]
    except KeyError:
        raise ModelProfileError(
            f"{profile.name}: unknown quant {quant!r} (valid: {', '.join(profile.quants)})") from None
    size = file_bytes or q.file_bytes
    return GgufHeader(metadata=profile.metadata, tensors=synth_tensors(profile.metadata, size), file_bytes=size)
