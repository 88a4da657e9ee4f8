"""Multi-head Latent Attention (DeepSeek-V2 §2.1; DeepSeek-V3 §2.1.1).

    c_Q  = RMSNorm(x W_DQ)                 [B,T,Q]     (or q = x W_Q directly when q_lora_rank is None)
    q    = c_Q W_UQ -> q_nope [B,T,H,K], q_rope [B,T,H,R] (RoPE on q_rope)
    c_KV = RMSNorm(x W_DKV)                [B,S,C]     the latent: all that is cached
    k_R  = RoPE(x W_KR)                    [B,S,R]     one rope key shared by every head
    k_nope, v = c_KV W_UK, c_KV W_UV       [B,S,H,K], [B,S,H,O]

One module, two ways to run it, selected by how it is called:

- no cache (training, scoring): expand k/v per head and attend ("naive");
- with a cache (prefill and decode): attend in latent space over the cached slots plus this
  call's own entries, with W_UK folded into the query and W_UV applied after attention
  ("absorbed", V2 §2.1.2's note on absorbing W_UK into W_UQ and W_UV into W_O), reading only
  (C + R) values per cached token. The layer returns just its new entries; the caller writes all
  layers' entries into the cache in place (`write_entries`), so the scan over layers never copies
  the stacked cache.

Masks: causal within a row plus equal segment ids (packed rows never attend across documents);
with a cache, a slot is visible to a query iff it holds a token (position >= 0) whose position
is <= the query's.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from dsjax.config import ModelConfig
from dsjax.model import cudnn_attention, decode_attention, rope
from dsjax.model.layers import Dense, RMSNorm, dtype_of, init_normal, matmul

NEG_INF = -1e30


class LayerCache(NamedTuple):
    """One layer's latent cache (stacked over layers by the scan): c_KV and the rotated rope key.
    MLA reads a cache and returns only the new entries in this form ([B, T, ...]);
    `write_entries` puts them in place."""

    c_kv_BSC: jax.Array
    k_rope_BSR: jax.Array


def write_entries(cache: Optional[LayerCache], new: Optional[LayerCache], write_index) -> Optional[LayerCache]:
    """The cache with this call's entries written at `write_index` along the slot axis — one
    in-place update of the (stacked or single-layer) buffers, so decoding never copies the cache."""
    if cache is None or new is None:
        return cache
    return LayerCache(*(jax.lax.dynamic_update_slice_in_dim(old, entry.astype(old.dtype), write_index, axis=old.ndim - 2)
                        for old, entry in zip(cache, new)))


class CacheView(NamedTuple):
    """What every layer shares about the cache for one call: where the new tokens are written and
    the position held by each slot after the write (-1: empty or padding)."""

    write_index: jax.Array  # int32 scalar
    kv_positions_BS: jax.Array  # int32


def attention_mask(positions_BT, segment_ids_BT, kv_positions_BS=None):
    """[B, T, S] bool: causal by index and same segment (no cache); by position (cache)."""
    if kv_positions_BS is None:
        t = positions_BT.shape[1]
        causal_TS = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
        same_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
        return causal_TS[None] & same_BTS
    return (kv_positions_BS[:, None, :] >= 0) & (kv_positions_BS[:, None, :] <= positions_BT[:, :, None])


def _flash_decode(q_lat_BTHC, q_rope_BTHR, positions_BT, cache: LayerCache, old_pos_BS, new_scores_BHTT,
                  new_mask_BTT, c_new_BTC, scale, interpret):
    """Absorbed attention with the cached slots read once by the flash-decoding kernel; the call's
    own T entries are merged in by log-sum-exp. Returns softmax·c_KV [B, T, H, C] in float32."""
    b, t, h, lat = q_lat_BTHC.shape
    o_BQC, m_BQ, l_BQ = decode_attention.sharded_latent_attention(
        q_lat_BTHC.reshape(b, t * h, lat), q_rope_BTHR.reshape(b, t * h, -1), jnp.repeat(positions_BT, h, axis=1),
        cache.c_kv_BSC, cache.k_rope_BSR, old_pos_BS, scale=float(scale), interpret=interpret)
    o_BTHC, m_BTH, l_BTH = o_BQC.reshape(b, t, h, lat), m_BQ.reshape(b, t, h), l_BQ.reshape(b, t, h)
    new_BTHU = jnp.where(new_mask_BTT[:, :, None, :], jnp.moveaxis(new_scores_BHTT, 1, 2).astype(jnp.float32), NEG_INF)
    m_all_BTH = jnp.maximum(m_BTH, new_BTHU.max(axis=-1))
    p_new_BTHU = jnp.where(new_mask_BTT[:, :, None, :], jnp.exp(new_BTHU - m_all_BTH[..., None]), 0.0)
    w_old_BTH = jnp.exp(m_BTH - m_all_BTH)
    o_BTHC = o_BTHC * w_old_BTH[..., None] + jnp.einsum("BTHU,BUC->BTHC", p_new_BTHU, c_new_BTC.astype(jnp.float32))
    l_BTH = l_BTH * w_old_BTH + p_new_BTHU.sum(axis=-1)
    return o_BTHC / l_BTH[..., None]


def _softmax(scores_BHTS, mask_BTS, dtype):
    scores_BHTS = jnp.where(mask_BTS[:, None], scores_BHTS.astype(jnp.float32), NEG_INF)
    return jax.nn.softmax(scores_BHTS, axis=-1).astype(dtype)


class MLA(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, positions_BT, segment_ids_BT, cache: Optional[LayerCache] = None,
                 view: Optional[CacheView] = None):
        c = self.config
        m = c.mla
        d, h, k, r, o, lat = c.hidden_size, m.num_attention_heads, m.qk_nope_head_dim, m.qk_rope_head_dim, \
            m.v_head_dim, m.kv_lora_rank
        dtype = dtype_of(c.dtype)

        if m.q_lora_rank is None:
            q_BTHX = Dense((d,), (h, k + r), ("embed", "heads", "head_dim"), c, name="q")(x_BTD)
        else:
            q_lat_BTQ = Dense((d,), (m.q_lora_rank,), ("embed", "q_lora"), c, name="q_a")(x_BTD)
            q_lat_BTQ = RMSNorm(m.q_lora_rank, c, name="q_a_norm")(q_lat_BTQ)
            q_BTHX = Dense((m.q_lora_rank,), (h, k + r), ("q_lora", "heads", "head_dim"), c, name="q_b")(q_lat_BTQ)
        q_BTHX = nn.with_logical_constraint(q_BTHX, ("batch", "length", "heads", "head_dim"))
        q_nope_BTHK, q_rope_BTHR = q_BTHX[..., :k], q_BTHX[..., k:]

        kv_BTX = Dense((d,), (lat + r,), ("embed", "kv_lora"), c, name="kv_a")(x_BTD)
        c_kv_BTC = RMSNorm(lat, c, name="kv_a_norm")(kv_BTX[..., :lat])
        cos, sin = rope.cos_sin(positions_BT, c)
        q_rope_BTHR = rope.apply_rope(q_rope_BTHR, cos, sin, c.rope.interleave)
        k_rope_BTR = rope.apply_rope(kv_BTX[..., lat:], cos, sin, c.rope.interleave)

        w_kvb_CHX = self.param("kv_b", nn.with_logical_partitioning(init_normal(c), ("kv_lora", "heads", "head_dim")),
                               (lat, h, k + o), dtype_of(c.param_dtype)).astype(dtype)
        scale = rope.softmax_scale(c)

        if cache is None:  # naive: expand per-head keys and values
            b, t = x_BTD.shape[:2]
            kv_BTHX = matmul(c_kv_BTC.reshape(b * t, lat), w_kvb_CHX.reshape(lat, h * (k + o)), c)
            kv_BTHX = nn.with_logical_constraint(kv_BTHX.reshape(b, t, h, k + o),
                                                 ("batch", "length", "heads", "head_dim"))
            k_nope_BSHK, v_BSHO = kv_BTHX[..., :k], kv_BTHX[..., k:]
            if c.attention == "cudnn":
                out_BTHO = cudnn_attention.attention(q_nope_BTHK, q_rope_BTHR, k_nope_BSHK, k_rope_BTR, v_BSHO,
                                                     segment_ids_BT, scale)
            else:
                scores_BHTS = (jnp.einsum("BTHK,BSHK->BHTS", q_nope_BTHK, k_nope_BSHK,
                                          preferred_element_type=jnp.float32)
                               + jnp.einsum("BTHR,BSR->BHTS", q_rope_BTHR, k_rope_BTR,
                                            preferred_element_type=jnp.float32))
                probs_BHTS = _softmax(scores_BHTS * scale, attention_mask(positions_BT, segment_ids_BT), dtype)
                out_BTHO = jnp.einsum("BHTS,BSHO->BTHO", probs_BHTS, v_BSHO)
            new_cache = None
        else:  # absorbed: attend in latent space over the cached slots plus this call's entries
            new_cache = LayerCache(c_kv_BTC.astype(cache.c_kv_BSC.dtype), k_rope_BTR.astype(cache.k_rope_BSR.dtype))
            t = x_BTD.shape[1]
            w_uk_CHK, w_uv_CHO = w_kvb_CHX[..., :k], w_kvb_CHX[..., k:]
            q_lat_BTHC = jnp.einsum("BTHK,CHK->BTHC", q_nope_BTHK, w_uk_CHK)
            c_new_BTC = new_cache.c_kv_BSC.astype(dtype)

            def scores(c_BSC, k_rope_BSR):
                return (jnp.einsum("BTHC,BSC->BHTS", q_lat_BTHC, c_BSC, preferred_element_type=jnp.float32)
                        + jnp.einsum("BTHR,BSR->BHTS", q_rope_BTHR, k_rope_BSR.astype(dtype),
                                     preferred_element_type=jnp.float32))

            slot_S = jnp.arange(cache.c_kv_BSC.shape[1])
            stale_S = (slot_S >= view.write_index) & (slot_S < view.write_index + t)  # rewritten by this call
            old_pos_BS = jnp.where(stale_S, -1, view.kv_positions_BS)
            new_pos_BT = jax.lax.dynamic_slice_in_dim(view.kv_positions_BS, view.write_index, t, axis=1)
            new_mask_BTT = attention_mask(positions_BT, None, new_pos_BT)
            s_old = cache.c_kv_BSC.shape[1]
            if c.decode_attention == "pallas" and decode_attention.fits(lat, r, s_old):
                out_lat_BTHC = _flash_decode(q_lat_BTHC, q_rope_BTHR, positions_BT, cache, old_pos_BS,
                                             scores(c_new_BTC, new_cache.k_rope_BSR) * scale, new_mask_BTT,
                                             c_new_BTC, scale, c.kernel_backend == "xla_cpu").astype(dtype)
            else:
                c_old_BSC = cache.c_kv_BSC.astype(dtype)
                old_mask_BTS = attention_mask(positions_BT, None, old_pos_BS)
                probs_BHTX = _softmax(jnp.concatenate([scores(c_old_BSC, cache.k_rope_BSR),
                                                       scores(c_new_BTC, new_cache.k_rope_BSR)], axis=-1) * scale,
                                      jnp.concatenate([old_mask_BTS, new_mask_BTT], axis=-1), dtype)
                out_lat_BTHC = (jnp.einsum("BHTS,BSC->BTHC", probs_BHTX[..., :s_old], c_old_BSC)
                                + jnp.einsum("BHTS,BSC->BTHC", probs_BHTX[..., s_old:], c_new_BTC))
            out_BTHO = jnp.einsum("BTHC,CHO->BTHO", out_lat_BTHC, w_uv_CHO)

        out_BTHO = nn.with_logical_constraint(out_BTHO, ("batch", "length", "heads", "head_dim"))
        y_BTD = Dense((h, o), (d,), ("heads", "head_dim", "embed"), c, name="o")(out_BTHO)
        return y_BTD, new_cache
