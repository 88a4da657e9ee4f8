"""Decoupled RoPE on the rope dims of MLA, with YaRN context extension.

DeepSeek-V2 §2.1.3 applies RoPE only to a separate `qk_rope_head_dim` slice of each query head and to
one key shared by all heads; the official checkpoints rotate interleaved pairs (x0,x1),(x2,x3),...
(DeepSeek's `apply_rotary_emb` through complex numbers). YaRN (Peng et al. 2023; DeepSeek-V2
App. B / V3 §4.3) blends interpolated and extrapolated frequencies over a ramp between the
`beta_fast` and `beta_slow` correction dims, and scales the softmax by
mscale(factor, mscale_all_dim)² where mscale(s, m) = 0.1·m·ln(s) + 1.

dsjax writes the rotated pairs back in place (even, odd interleaved). Transformers writes
[rotated evens, rotated odds]; q·k is identical either way, only a cached key's layout differs.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from dsjax.config import ModelConfig, RopeConfig


def yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


def inverse_frequencies(rope: RopeConfig, dim: int) -> np.ndarray:
    """[dim/2] float32 inverse frequencies, YaRN-blended when rope.scaling == 'yarn'."""
    pos_freqs = rope.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    extrapolated = 1.0 / pos_freqs
    if rope.scaling == "none":
        return extrapolated.astype(np.float32)
    interpolated = 1.0 / (rope.factor * pos_freqs)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
            2 * math.log(rope.rope_theta))

    low = max(math.floor(correction_dim(rope.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rope.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    keep_extrapolated = 1.0 - ramp
    return (interpolated * (1 - keep_extrapolated) + extrapolated * keep_extrapolated).astype(np.float32)


def cos_sin(positions, config: ModelConfig):
    """cos, sin [..., R/2] float32 for integer positions [...]."""
    rope = config.rope
    inv_freq = jnp.asarray(inverse_frequencies(rope, config.mla.qk_rope_head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    # YaRN's cos/sin factor: 1 for every DeepSeek config (mscale == mscale_all_dim); a 0 mscale
    # field means "absent in config.json", where transformers falls back to mscale(factor, 1).
    attn_factor = 1.0
    if rope.scaling == "yarn":
        if rope.mscale and rope.mscale_all_dim:
            attn_factor = yarn_mscale(rope.factor, rope.mscale) / yarn_mscale(rope.factor, rope.mscale_all_dim)
        else:
            attn_factor = yarn_mscale(rope.factor, 1.0)
    return jnp.cos(angles) * attn_factor, jnp.sin(angles) * attn_factor


def apply_rope(x, cos, sin, interleave: bool = True):
    """Rotates x [B, T, (H,) R] by cos/sin [B, T, R/2] in float32; returns x's dtype."""
    if x.ndim == cos.ndim + 1:  # a heads axis
        cos, sin = cos[..., None, :], sin[..., None, :]
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    if interleave:
        x1, x2 = x32[..., 0::2], x32[..., 1::2]
    else:
        x1, x2 = x32[..., :half], x32[..., half:]
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    if interleave:
        y = jnp.stack([y1, y2], axis=-1).reshape(x.shape)
    else:
        y = jnp.concatenate([y1, y2], axis=-1)
    return y.astype(x.dtype)


def softmax_scale(config: ModelConfig) -> float:
    """(qk_nope + qk_rope)^-1/2, times mscale(factor, mscale_all_dim)^2 under YaRN."""
    scale = (config.mla.qk_nope_head_dim + config.mla.qk_rope_head_dim) ** -0.5
    if config.rope.scaling == "yarn" and config.rope.mscale_all_dim:
        scale *= yarn_mscale(config.rope.factor, config.rope.mscale_all_dim) ** 2
    return scale
