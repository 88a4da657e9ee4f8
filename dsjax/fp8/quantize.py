"""Fine-grained FP8 (E4M3) quantization with one float32 scale per block (DeepSeek-V3 §3.3.2).

DeepSeek-V3 scales activations per 1x128 tile (one token, 128 channels) and weights per 128x128
block, so one outlier only coarsens its own block. Each block's scale is amax(|block|) / 448, which
maps the block's largest magnitude onto E4M3's largest finite value, and q = x / scale rounded to
the nearest E4M3 value (ties to even). This is the math of `act_quant` in DeepSeek's
`inference/kernel.py`, and the inverse of its `weight_dequant` (checkpoints store the same number as
`weight_scale_inv`, so x ≈ q * scale there too).

`block_shape` covers the trailing `len(block_shape)` dims of x; every leading dim is its own block
(size 1). So x [B, T, D] with (1, 128) gets scale [B, T, ceil(D/128)], and stacked expert weights
w [E, K, N] with (128, 128) get scale [E, ceil(K/128), ceil(N/128)]. In general
scale.shape == ceil(x.shape / block_shape). (128, 1) gives the 128x1 tiles along tokens that the
weight gradient uses (V3 §3.3.3), and block_shape = x.shape gives one scale per tensor.

Where dsjax deviates from DeepSeek's kernels (each is tested in tests/test_fp8.py):
- Edge blocks: a dim that is not a multiple of its block ends in a partial block, scaled by its own
  contents. (`act_quant` requires whole tiles; `weight_dequant` masks partial blocks, so checkpoint
  weight scales, e.g. kv_a_proj's 576 rows, already follow this rule.)
- A block of zeros gets scale 1 and q = 0. DeepSeek's 2024 `act_quant` divides 0 by amax/448 = 0 and
  gives NaN; since 2025-08 it clamps amax to 1e-4. dsjax also uses 1 where amax / 448 underflows.
- `pow2_scale=True` rounds the scale up to a power of two, as DeepSeek's `scale_fmt="ue8m0"` (V3.1)
  does with exp2(ceil(log2(s))); dsjax takes it exactly from the float bits (as DeepGEMM's
  ceil_to_ue8m0 does), so an amax of exactly 448 * 2^k keeps scale 2^k.
- XLA's algebraic simplifier turns a division by a constant or a broadcast into a multiplication by
  its reciprocal, so scale = amax * fl(1/448) and q = rne(x * fl(1/scale)): scale can be one float32
  ulp off amax / 448, and q one E4M3 step off where x / scale lies within ~1 float32 ulp of a
  rounding midpoint. DeepSeek's own references mix both forms (DeepGEMM's per_token_cast_to_fp8
  multiplies by 448 / amax); the test checks this bound against an IEEE-division transcription.
  fl(1/448) is within 2^-24 of 1/448, so the product never crosses a power of two that the exact
  quotient does not (checked over a whole binade), and pow2 scales are exact for normal scales.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

E4M3_MAX = 448.0  # largest finite float8_e4m3fn
_MANTISSA_MASK = 0x007FFFFF
_EXPONENT_MASK = 0x7F800000


def _full_block_shape(shape: tuple[int, ...], block_shape: Sequence[int]) -> tuple[int, ...]:
    block_shape = tuple(int(b) for b in block_shape)
    if len(block_shape) > len(shape) or any(b < 1 for b in block_shape):
        raise ValueError(
            f"block_shape {block_shape} must be positive and cover at most the {len(shape)} dims of "
            f"an array of shape {shape}")
    return (1,) * (len(shape) - len(block_shape)) + block_shape


def _scale_shape(shape: tuple[int, ...], full: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(-(-d // b) for d, b in zip(shape, full))


def _to_blocks(x: jax.Array, full: tuple[int, ...]) -> jax.Array:
    """Zero-pad x to whole blocks and split each dim d into (d/b, b): [n0, b0, n1, b1, ...]."""
    n_blocks = _scale_shape(x.shape, full)
    pad = [(0, n * b - d) for d, b, n in zip(x.shape, full, n_blocks)]
    if any(hi for _, hi in pad):
        x = jnp.pad(x, pad)  # zeros leave every amax unchanged
    return x.reshape([s for nb in zip(n_blocks, full) for s in nb])


def _from_blocks(xb: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    padded = tuple(xb.shape[i] * xb.shape[i + 1] for i in range(0, xb.ndim, 2))
    x = xb.reshape(padded)
    if padded != tuple(shape):
        x = x[tuple(slice(0, d) for d in shape)]
    return x


def _ceil_pow2(s: jax.Array) -> jax.Array:
    """Smallest power of two >= s for finite s >= 0 (2^-126 for subnormal s), exact from the bits."""
    bits = jax.lax.bitcast_convert_type(s, jnp.uint32)
    bits = (bits + _MANTISSA_MASK) & _EXPONENT_MASK  # a nonzero mantissa carries into the exponent
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def quantize_blocks(x: jax.Array, block_shape: Sequence[int], *,
                    pow2_scale: bool = False) -> tuple[jax.Array, jax.Array]:
    """x (any float dtype) -> (q float8_e4m3fn shaped like x, scale float32 [ceil(x.shape / block)]).

    scale = amax(|block|) / 448 (1 for a block of zeros; rounded up to a power of two when
    pow2_scale); q = round-to-nearest-even(clip(x / scale, ±448)).
    """
    full = _full_block_shape(x.shape, block_shape)
    xb = _to_blocks(x.astype(jnp.float32), full)
    amax = jnp.max(jnp.abs(xb), axis=tuple(range(1, xb.ndim, 2)), keepdims=True)
    scale = amax / E4M3_MAX
    if pow2_scale:
        scale = _ceil_pow2(scale)
    scale = jnp.where(scale > 0, scale, 1.0)
    qb = jnp.clip(xb / scale, -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn)
    # XLA:GPU's SimplifyFPConversions (on under the default xla_allow_excess_precision) folds the
    # chain f32 -> f8 -> f32 into nothing, so a caller that dequantizes q in the same jit would get
    # x back unrounded. The barrier keeps the rounding; q is materialized either way.
    q = jax.lax.optimization_barrier(_from_blocks(qb, x.shape))
    return q, scale.reshape(_scale_shape(x.shape, full))


def dequantize_blocks(q: jax.Array, scale: jax.Array, block_shape: Sequence[int]) -> jax.Array:
    """float32 q * scale, each scale broadcast over its block (partial edge blocks included)."""
    full = _full_block_shape(q.shape, block_shape)
    want = _scale_shape(q.shape, full)
    if scale.shape != want:
        raise ValueError(f"scale has shape {scale.shape}; q {q.shape} in blocks {full} needs {want}")
    qb = _to_blocks(q.astype(jnp.float32), full)
    scale_b = scale.astype(jnp.float32).reshape([s for n in want for s in (n, 1)])
    return _from_blocks(qb * scale_b, q.shape)
