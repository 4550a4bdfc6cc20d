"""ggml tensor types: id, name, values per block and bytes per block (pure)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class GgmlType:
    """One ggml storage type: `block_bytes` bytes hold `block_size` values."""

    type_id: int
    name: str
    block_size: int
    block_bytes: int


# Copied from gguf-py GGML_QUANT_SIZES in the llama.cpp vendored by llama-cpp-python 0.3.36.
_TYPES: tuple[GgmlType, ...] = (
    GgmlType(0, "f32", 1, 4),
    GgmlType(1, "f16", 1, 2),
    GgmlType(2, "q4_0", 32, 18),
    GgmlType(3, "q4_1", 32, 20),
    GgmlType(6, "q5_0", 32, 22),
    GgmlType(7, "q5_1", 32, 24),
    GgmlType(8, "q8_0", 32, 34),
    GgmlType(9, "q8_1", 32, 36),
    GgmlType(10, "q2_k", 256, 84),
    GgmlType(11, "q3_k", 256, 110),
    GgmlType(12, "q4_k", 256, 144),
    GgmlType(13, "q5_k", 256, 176),
    GgmlType(14, "q6_k", 256, 210),
    GgmlType(15, "q8_k", 256, 292),
    GgmlType(16, "iq2_xxs", 256, 66),
    GgmlType(17, "iq2_xs", 256, 74),
    GgmlType(18, "iq3_xxs", 256, 98),
    GgmlType(19, "iq1_s", 256, 50),
    GgmlType(20, "iq4_nl", 32, 18),
    GgmlType(21, "iq3_s", 256, 110),
    GgmlType(22, "iq2_s", 256, 82),
    GgmlType(23, "iq4_xs", 256, 136),
    GgmlType(24, "i8", 1, 1),
    GgmlType(25, "i16", 1, 2),
    GgmlType(26, "i32", 1, 4),
    GgmlType(27, "i64", 1, 8),
    GgmlType(28, "f64", 1, 8),
    GgmlType(29, "iq1_m", 256, 56),
    GgmlType(30, "bf16", 1, 2),
    GgmlType(34, "tq1_0", 256, 54),
    GgmlType(35, "tq2_0", 256, 66),
    GgmlType(39, "mxfp4", 32, 17),
    GgmlType(40, "nvfp4", 64, 36),
    GgmlType(41, "q1_0", 128, 18),
    GgmlType(42, "q2_0", 64, 18),
)

BY_ID: dict[int, GgmlType] = {t.type_id: t for t in _TYPES}
BY_NAME: dict[str, GgmlType] = {t.name: t for t in _TYPES}

# Types llama.cpp accepts for --cache-type-k / --cache-type-v (common/arg.cpp kv_cache_types).
KV_CACHE_TYPES: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")


def ggml_type(name_or_id: str | int) -> GgmlType:
    """The ggml type for a name ("q8_0", case-insensitive) or numeric id; KeyError names the valid choices."""
    if isinstance(name_or_id, int):
        try:
            return BY_ID[name_or_id]
        except KeyError:
            raise KeyError(f"unknown ggml type id {name_or_id}") from None
    try:
        return BY_NAME[name_or_id.lower()]
    except KeyError:
        raise KeyError(f"unknown ggml type {name_or_id!r} (valid: {', '.join(BY_NAME)})") from None


def row_bytes(type_: GgmlType, n_values: int) -> int:
    """Bytes of one row of `n_values` values, as ggml_row_size (rounds up to whole blocks)."""
    return -(-n_values // type_.block_size) * type_.block_bytes


def tensor_bytes(type_: GgmlType, shape: tuple[int, ...]) -> int:
    """Bytes of a contiguous tensor: rows of shape[0] values times the other dims, as ggml_nbytes."""
    if not shape:
        return 0
    n_rows = 1
    for dim in shape[1:]:
        n_rows *= dim
    return row_bytes(type_, shape[0]) * n_rows
