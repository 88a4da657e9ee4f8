"""The latent KV cache: per token and layer only c_KV and the rotated rope key.

MLA (DeepSeek-V2 §2.1.2-2.1.4) caches the normalized latent c_KV [C] and the decoupled rope key
k_R [R] that every head shares — (kv_lora_rank + qk_rope_head_dim) values per token per layer,
576 for DeepSeek-V3 — where multi-head attention caches 2·H·head_dim (32,768 for V3's 128 heads of
128). V2 reports a 93.3% smaller cache than DeepSeek 67B's. Decoding attends over it directly with
W_UK absorbed into the query and W_UV applied after attention (V2 §2.1.2; dsjax.model.mla's
"absorbed" branch), so nothing is re-expanded.

Layout: `ModelCache(dense, moe, mtp)` of `LayerCache(c_kv_BSC, k_rope_BSR)`, stacked over the
layers of each scanned stack ([L, B, S, ...]) and one per MTP module ([B, S, ...]), in the compute
dtype. A `CacheView(write_index, kv_positions_BS)` says where a call writes and which position each
slot holds (-1: empty, left padding or a rolled-back draft), which is all the attention mask needs.
Inside jit under `dsjax.sharding.activation_rules()` and a mesh, the batch axis is constrained to
('data', 'expert') like every activation; `shardings()` gives the same placement outside jit.

dsjax keeps the cache in the compute dtype (bf16 on GPU); DeepSeek's inference code does too.
FP8 caches (FlashMLA's 656-byte format) are not implemented.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from dsjax import sharding as shd
from dsjax.config import ModelConfig
from dsjax.model import CacheView, LayerCache, ModelCache

# Logical names of a cache leaf's dims (activation rules: batch over ('data', 'expert')).
_STACKED = (None, "batch", "length", "kv_lora")
_SINGLE = ("batch", "length", "kv_lora")


def _layer(config: ModelConfig, lead: tuple, batch: int, length: int, dtype) -> LayerCache:
    m = config.mla
    return LayerCache(jnp.zeros(lead + (batch, length, m.kv_lora_rank), dtype),
                      jnp.zeros(lead + (batch, length, m.qk_rope_head_dim), dtype))


def init_cache(config: ModelConfig, batch: int, length: int, *, mtp: bool = True, dtype=None) -> ModelCache:
    """An empty cache of `length` slots for `batch` rows (with the MTP modules' caches when `mtp`).

    Zeros in `dtype` (default: the compute dtype). Constrained to the batch sharding when called
    under jit with a mesh and the activation rules active; a no-op otherwise.
    """
    dtype = jnp.dtype(dtype or config.dtype)

    def stack(n: int) -> Optional[LayerCache]:
        if not n:
            return None
        layer = _layer(config, (n,), batch, length, dtype)
        return LayerCache(*(nn.with_logical_constraint(x, _STACKED) for x in layer))

    mtp_caches = ()
    if mtp:
        mtp_caches = tuple(LayerCache(*(nn.with_logical_constraint(x, _SINGLE) for x in _layer(config, (), batch,
                                                                                                   length, dtype)))
                           for _ in range(config.mtp.num_nextn_predict_layers))
    return ModelCache(stack(config.num_dense_layers), stack(config.num_moe_layers), mtp_caches)


def empty_view(batch: int, length: int) -> CacheView:
    """Nothing written yet: every slot empty."""
    return CacheView(jnp.zeros((), jnp.int32), jnp.full((batch, length), -1, jnp.int32))


def shardings(config: ModelConfig, batch: int, length: int, mesh: jax.sharding.Mesh, *, mtp: bool = True):
    """NamedShardings of `init_cache(...)`'s leaves on `mesh` (batch over ('data', 'expert'))."""
    abstract = jax.eval_shape(lambda: init_cache(config, batch, length, mtp=mtp))

    def one(x):
        lead = (None,) * (x.ndim - 3)
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*lead, shd.BATCH, None, None))

    return jax.tree_util.tree_map(one, abstract)


def values_per_token_per_layer(config: ModelConfig) -> int:
    """Cached values per token per layer, counted from the allocated arrays' shapes (every layer,
    MTP modules included, holds the same): kv_lora_rank + qk_rope_head_dim."""
    abstract = jax.eval_shape(lambda: init_cache(config, 1, 1))
    layers = config.num_hidden_layers + config.mtp.num_nextn_predict_layers
    total = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(abstract))
    return total // layers


def bytes_per_token_per_layer(config: ModelConfig, dtype=None) -> int:
    """Bytes of cache one token takes in one layer (in `dtype`, default the compute dtype)."""
    return values_per_token_per_layer(config) * jnp.dtype(dtype or config.dtype).itemsize


def cache_bytes(config: ModelConfig, batch: int, length: int, *, mtp: bool = True, dtype=None) -> int:
    """Total bytes of `init_cache(config, batch, length, mtp=mtp, dtype=dtype)`, without allocating."""
    abstract = jax.eval_shape(lambda: init_cache(config, batch, length, mtp=mtp, dtype=dtype))
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(abstract))
