"""Which flash-attention kernel llama.cpp's CUDA backend runs for a decoded token, and how it splits the cache (pure).

The choice follows ggml_cuda_get_best_fattn_kernel (ggml-cuda/fattn.cu) and the MMA kernel's configurations
(fattn-mma-f16.cuh, Ampere table, which Ada, Hopper and Blackwell use) in the llama.cpp that llama-cpp-python
0.3.36 vendors, for one token of one sequence:
- the vec kernel reads the cache once per query head; its time grows with the cached tokens and nothing else;
- the MMA kernel reads it once per KV head (its query heads share the tile) and splits the cache with stream-k:
  one block per `tile_tokens` of cache until the blocks fill the GPU (SMs x occupancy over the output tiles),
  then more tiles per block. A fixup kernel combines each output tile's partial results one after the other, so
  the cost per cached token is high until the GPU is full (the partials grow with the depth) and low after.
On Ada and newer with an f16 cache the vec kernel runs unless the layer has more than 4 query heads per KV head
and a head of 256 or more, or a cache view of 8192 tokens or more; heads wider than 256 (MLA's 576) have no vec
kernel. Turing and Ampere run the MMA kernel for any GQA layer. A quantized cache runs the vec kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hybridd.model.spec import LayerSpec

ADA = 89  # compute capability x 10 from which single-token decode prefers the vec kernel
TURING = 75  # the first with the tensor-core (MMA) kernel
# The cache view llama.cpp attends over is padded to 256 cells (llama_kv_cache::get_n_kv), so a view of 8192
# starts when 7937 tokens are cached (the new token's own cell included).
MMA_VIEW_TOKENS = 8192
KV_PAD = 256
MMA_FROM_DEPTH = MMA_VIEW_TOKENS - KV_PAD
QUANTIZED_CACHE_TYPES = frozenset({"q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl"})


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


def _mma_config(key_length: int) -> tuple[int, int, int]:
    """(query heads per output tile, occupancy, tile tokens) of the decode configuration for a head size."""
    if key_length == 576:  # MLA: (576, 512, 16 columns): 4 blocks an SM, 32 tokens a tile
        return 16, 4, 32
    if key_length >= 256:  # (256, 256, 8) and (512, 512, 8): 2 blocks an SM, 64 tokens a tile
        return 8, 2, 64
    return 8, 2, 128  # (64..128, same, 8 columns): 2 blocks an SM, 128 tokens a tile


def _heads_per_tile(gqa: int, most: int) -> int:
    """The largest power of two up to `most` that divides the query heads per KV head."""
    n = 1
    while gqa % (2 * n) == 0 and n < most:
        n *= 2
    return n


def decode_kernel(layer: LayerSpec, compute_capability: int, sms: int, cache_type: str = "f16") -> DecodeKernel | None:
    """The kernel `layer`'s attention runs for one decoded token on a GPU of `compute_capability` (major x 10 +
    minor) with `sms` multiprocessors; None when either is unknown or the GPU has no tensor-core kernel."""
    if compute_capability < TURING or sms <= 0 or layer.n_head <= 0 or layer.n_head_kv <= 0:
        return None
    gqa = max(layer.n_head // layer.n_head_kv, 1)
    wide = layer.key_length > 256
    if cache_type in QUANTIZED_CACHE_TYPES and not wide:
        return VEC
    if compute_capability >= ADA:
        if not wide and gqa <= 4:
            return VEC
        mma_from = 0.0 if wide or layer.key_length >= 256 else float(MMA_FROM_DEPTH)
    else:
        if gqa < 2 and not wide:
            return VEC
        mma_from = 0.0
    most, occupancy, tile = _mma_config(layer.key_length)
    per_tile = _heads_per_tile(gqa, most) if layer.key_length != 576 else most
    output_tiles = layer.n_head_kv * math.ceil(gqa / per_tile)
    return DecodeKernel(mma_from, tile, max(1, sms * occupancy // output_tiles))
