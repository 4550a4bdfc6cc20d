"""What a GGUF header says, as plain data: metadata keys and tensor infos (pure)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hybridd.model.ggml_types import GgmlType, tensor_bytes


@dataclass(frozen=True, slots=True)
class OmittedArray:
    """A long metadata array (tokenizer lists) kept only as its length, so reading stays fast."""

    element_type: str
    length: int


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor as the header describes it; shape is in ggml order (ne[0] first)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: GgmlType

    @property
    def n_bytes(self) -> int:
        """Bytes of this tensor's data in the file and in a backend buffer."""
        return tensor_bytes(self.ggml_type, self.shape)

    @property
    def n_values(self) -> int:
        """Number of values (parameters) in this tensor."""
        n = 1
        for dim in self.shape:
            n *= dim
        return n


@dataclass(frozen=True, slots=True)
class GgufHeader:
    """Metadata and tensor infos of a model (all split files together), never the weights."""

    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...]
    file_bytes: int = 0
    paths: tuple[str, ...] = field(default=())

    @property
    def architecture(self) -> str:
        """`general.architecture`, or "" when the header lacks it."""
        return str(self.metadata.get("general.architecture", ""))
