"""Which flash-attention kernel llama.cpp's CUDA backend runs for a decoded token, and how it splits the cache (pure).

The choice follows ggml_cuda_get_best_fattn_kernel, the MMA launch's heads per tile (switch_ncols2, and the
576-wide case) and the MMA kernel's configurations (fattn-mma-f16.cuh) in the llama.cpp that llama-cpp-python
0.3.36 vendors, for one token of one sequence:
- the vec kernel reads the cache once per query head; its time grows with the cached tokens and nothing else;
- the MMA kernel reads it once per KV head (its query heads share the tile) and splits the cache with stream-k:
  one block per `tile_tokens` of cache until the blocks fill the GPU (SMs x occupancy over the output tiles),
  then more tiles per block. A fixup kernel combines each output tile's partial results one after the other, so
  the cost per cached token is high until the GPU is full (the partials grow with the depth) and low after.
The vec kernel exists for heads of 64, 128 and 256. On Ada and newer with an f16 cache it runs unless the layer has
more than 4 query heads per KV head and a head of 256 or a cache view of 8192 tokens or more; Turing and Ampere run
the MMA kernel for any GQA layer; other head sizes run the MMA kernel throughout (40 and 72: the tile kernel, not
modelled). A quantized cache runs the vec kernel where there is one.
Not modelled: several sequences decoding at once (any GQA layer then runs the MMA kernel), the sparse gather of
sparse-attention models, and where a configuration depends on the view (GLM's 576-wide heads on Blackwell and
Turing), the layer's whole cache is taken as the view.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hybridd.model.spec import LayerSpec

ADA = 89  # compute capability x 10 from which single-token decode prefers the vec kernel
TURING = 75  # the first with the tensor-core (MMA) kernel
AMPERE = 80
BLACKWELL, GB10 = 120, 121
# The cache view llama.cpp attends over is padded to 256 cells (llama_kv_cache::get_n_kv), so a view of 8192
# starts when 7937 tokens are cached (the new token's own cell included).
MMA_VIEW_TOKENS = 8192
KV_PAD = 256
MMA_FROM_DEPTH = MMA_VIEW_TOKENS - KV_PAD
QUANTIZED_CACHE_TYPES = frozenset({"q8_0", "q4_0", "q4_1", "q5_0", "q5_1"})
CACHE_TYPES = QUANTIZED_CACHE_TYPES | {"f16", "bf16", "f32"}  # ggml_cuda_fattn_kv_type_supported
VEC_HEADS = frozenset({64, 128, 256})
# (K head, V head) pairs of the MMA kernel, and the query heads per KV head each needs a multiple of
MMA_SHAPES = {(64, 64): 1, (80, 80): 1, (96, 96): 1, (112, 112): 1, (128, 128): 1, (192, 128): 8, (256, 256): 1,
              (320, 256): 32, (512, 512): 1, (576, 512): 1}


@dataclass(frozen=True, slots=True)
class DecodeKernel:
    """How one layer's attention runs for a decoded token on one GPU."""

    mma_from: float  # cached tokens from which the MMA kernel runs: 0 always, math.inf never (the vec kernel)
    tile_tokens: int = 0  # cache tokens an MMA block takes per step (nbatch_fa)
    max_partials: int = 0  # partial results per output tile once the blocks fill the GPU

    @property
    def partials_cap(self) -> int:
        """Cached tokens from which the partials stop growing."""
        return self.tile_tokens * self.max_partials


VEC = DecodeKernel(mma_from=math.inf)


def _heads_per_tile(key_length: int, gqa: int, cc: int, view: int) -> int:
    """Query heads of one KV head an MMA output tile holds (ncols2) for one decoded token."""
    if key_length == 576:
        if gqa == 20:  # GLM-4.7-Flash
            if cc >= GB10 or (ADA <= cc < BLACKWELL):
                return 16
            if cc >= BLACKWELL:
                return 16 if view >= 65536 else 4
            return 16 if view <= 16384 else 32
        return 16 if gqa % 16 == 0 else 4
    return 8 if gqa > 4 else 4 if gqa > 2 else 2 if gqa > 1 else 1


def _mma_config(key_length: int, columns: int, cc: int) -> tuple[int, int]:
    """(blocks an SM, cache tokens a tile) of the decode configuration: the Ampere table, which Ada, Hopper and
    Blackwell share, and Turing's for 512-wide heads."""
    if key_length == 576:
        return (4, 32) if columns <= 16 else (2, 32)
    if key_length == 512:
        return (4, 32) if cc < AMPERE else (2, 64)
    if key_length >= 256:
        return 2, 64
    return 2, 128


def decode_kernel(layer: LayerSpec, compute_capability: int, sms: int, cache_type: str = "f16",
                  cells: int = 1 << 30) -> DecodeKernel | None:
    """The kernel `layer`'s attention runs for one decoded token on a GPU of `compute_capability` (major x 10 +
    minor) with `sms` multiprocessors, over a cache of at most `cells`; None when either is unknown, the GPU has
    no tensor-core kernel, or the shape or cache type has no flash-attention kernel this models."""
    cc = compute_capability
    if cc < TURING or sms <= 0 or layer.n_head <= 0 or layer.n_head_kv <= 0:
        return None
    gqa = max(layer.n_head // layer.n_head_kv, 1)
    shape = (layer.key_length, layer.value_length)
    if shape not in MMA_SHAPES or gqa % MMA_SHAPES[shape] or cache_type not in CACHE_TYPES:
        return None
    vec_ok = layer.key_length in VEC_HEADS
    if vec_ok and cache_type in QUANTIZED_CACHE_TYPES:
        return VEC
    mma_from = 0.0
    if vec_ok and cc >= ADA:
        if gqa <= 4:
            return VEC
        if layer.key_length < 256:
            if cells < MMA_VIEW_TOKENS:  # the view never reaches 8192 (a sliding window)
                return VEC
            mma_from = float(MMA_FROM_DEPTH)
    elif vec_ok and gqa < 2:
        return VEC
    columns = _heads_per_tile(layer.key_length, gqa, cc, cells)
    occupancy, tile = _mma_config(layer.key_length, max(8, columns), cc)
    output_tiles = layer.n_head_kv * math.ceil(gqa / columns)
    return DecodeKernel(mma_from, tile, max(1, sms * occupancy // output_tiles))
