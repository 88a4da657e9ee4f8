"""Token sampling: greedy, temperature, top-k and top-p (nucleus), pure functions of logits and an
explicit PRNG key.

`filter_logits` turns logits into the tempered, truncated log-weights a sample is drawn from
(-inf outside the kept set); `sample` draws from them, or takes the argmax when temperature is 0.
Temperature, top_k and top_p are Python numbers (static under jit: one compile per setting).
Order: temperature, then top-k, then top-p over what top-k kept (as transformers' warpers apply
them). Top-p keeps the smallest prefix of the sorted distribution whose mass reaches p (the
most likely token always stays). All math in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def check(temperature: float, top_k: int, top_p: float) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 keeps every token), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def greedy(logits_BV) -> jax.Array:
    """int32 [B]: the most likely token (the lowest id among exact ties, as jnp.argmax)."""
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)


def _top_p_mask(sorted_BX, top_p: float):
    """Keep-mask over logits sorted in descending order: the smallest prefix with mass >= top_p."""
    probs_BX = jax.nn.softmax(sorted_BX, axis=-1)
    mass_before_BX = jnp.cumsum(probs_BX, axis=-1) - probs_BX
    return mass_before_BX < top_p


def filter_logits(logits_BV, *, temperature: float, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """float32 [B, V]: logits / temperature with every token outside top-k / top-p set to -inf.
    Temperature must be > 0 here (greedy needs no distribution)."""
    logits_BV = logits_BV.astype(jnp.float32) / temperature
    v = logits_BV.shape[-1]
    if 0 < top_k < v:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, NEG_INF, logits_BV)
    if top_p < 1.0:
        sorted_BV = -jnp.sort(-logits_BV, axis=-1)
        keep_BV = _top_p_mask(sorted_BV, top_p)
        # the smallest kept logit is the threshold (ties at the threshold are all kept)
        threshold_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < threshold_B1, NEG_INF, logits_BV)
    return logits_BV


def probabilities(logits_BV, *, temperature: float, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """float32 [B, V]: the distribution `sample` draws from (one-hot at the argmax when greedy)."""
    if temperature == 0.0:
        return jax.nn.one_hot(greedy(logits_BV), logits_BV.shape[-1], dtype=jnp.float32)
    return jax.nn.softmax(filter_logits(logits_BV, temperature=temperature, top_k=top_k, top_p=top_p), axis=-1)


def sample(logits_BV, rng, *, temperature: float, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """int32 [B]: one token per row; rows draw independently from one key."""
    if temperature == 0.0:
        return greedy(logits_BV)
    if 0 < top_k < logits_BV.shape[-1]:  # draw among the top-k only: no full-vocabulary sort
        vals_BK, ids_BK = jax.lax.top_k(logits_BV.astype(jnp.float32) / temperature, top_k)
        if top_p < 1.0:
            vals_BK = jnp.where(_top_p_mask(vals_BK, top_p), vals_BK, NEG_INF)
        pick_B = jax.random.categorical(rng, vals_BK, axis=-1)
        return jnp.take_along_axis(ids_BK, pick_B[:, None], axis=-1)[:, 0].astype(jnp.int32)
    filtered_BV = filter_logits(logits_BV, temperature=temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(rng, filtered_BV, axis=-1).astype(jnp.int32)
